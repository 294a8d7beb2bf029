"""The fix catalogue: data, registered in one place.

Each entry is an id, a title, the mechanism, a code snippet adapted to the finding, the config
change that applies it automatically (when there is one), and a scoring rule that says how
strongly the finding points at it. A new failure mode is one new entry here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nanprobe.enums import DataProblem, FindingKind, Framework, Mode, Phase, Precision, Status
from nanprobe.model.report import Finding, FixSuggestion, ReplayError
from nanprobe.thresholds import DIVERGENCE_GROWTH, INIT_FACTOR, INIT_SMALL_FACTOR, SAFE_EPS, init_off_scale

_NORM_NODES = ("SqrtBackward0", "LinalgVectorNormBackward0", "NormBackward1", "PowBackward0", "RsqrtBackward0")
_PRECISION_FIXES = frozenset({"gp-fp32", "gp-scaled", "grad-scaler", "bf16", "fp32-module", "master-weights"})


@dataclass(frozen=True)
class ChainOp:
    """One op on the root cause's path, as the fix rules see it."""

    op: str
    """aten op's base name (sqrt, add_, _to_copy)."""
    node: str | None
    """Autograd node (backward ops)."""
    dtype: str
    """Output dtype."""
    phase: Phase
    """Phase."""
    module: str
    """Module path."""
    scalars: tuple = ()
    """Python float arguments (an eps, a power)."""
    zeroed: bool = False
    """Its output holds zeros where fp32's does not (or zeros at all, without a reference)."""
    nonfinite: bool = False
    """Its output holds inf or NaN."""
    cast: bool = False
    """A cast, copy or reshape (rules look through it)."""
    lost_eps: float | None = None
    """An eps it adds that rounds to 0 in its dtype."""
    kept_eps: float | None = None
    """An eps it adds that survives its dtype (a guard already in place)."""
    index: int = -1
    """Event index."""


@dataclass(frozen=True)
class FixContext:
    """What the scoring rules look at."""

    precision: Precision
    """The run's precision."""
    mode: Mode
    """amp | half."""
    status: Status
    """The run's status."""
    issue: Finding | None
    """First issue."""
    nonfinite: Finding | None
    """First non-finite value."""
    chain_nodes: tuple = ()
    """Autograd nodes and ops on the chain."""
    chain: tuple[ChainOp, ...] = ()
    """The root cause's path, origin first, end (the non-finite op or the gradient that is off) last."""
    culprit: ChainOp | None = None
    """The op the headline names (one of `chain`)."""
    after: tuple[ChainOp, ...] = ()
    """The ops that consume the culprit's output, nearest first (what it was feeding)."""
    feeds: tuple[ChainOp, ...] = ()
    """The ops whose outputs the chain's origin takes (casts looked through): what it was fed."""
    penalty_fp32: bool = False
    """The penalty's input gradient is computed in fp32 outside autocast (scaling it would change nothing)."""
    fp32_ok: bool = True
    """The fp32 replay found nothing."""
    other: dict = field(default_factory=dict)
    """Status of each other precision."""
    loss_kind: str = "wgan-gp"
    """Built-in loss kind (or "custom")."""
    gp_fp32: bool = False
    """The penalty already runs outside autocast."""
    grad_scaler: bool = False
    """A GradScaler is on."""
    grad_clip: float | None = None
    """Clipping threshold."""
    optimizer: str = "adam"
    """Optimizer name."""
    eps: float = 1e-8
    """Optimizer eps."""
    lr: float = 1e-4
    """Learning rate."""
    init_ratios: dict = field(default_factory=dict)
    """Module path -> weight std / He std."""
    init_checks: tuple = ()
    """initialisation.InitCheck per weight layer (for the init fix's module, numbers and call)."""
    data_problems: tuple = ()
    """What the data check found in the replayed samples (DataProblem values: non-finite, constant, range)."""
    device: str = "cuda"
    """Device type for snippets."""
    fp32_modules: tuple = ()
    """Modules already run in fp32 (precision.fp32_modules)."""
    collapse: Finding | None = None
    """The op that kept making inf while GradScaler's scale fell."""
    unscaled_penalty: bool = False
    """The step calls torch.autograd.grad on outputs the GradScaler did not scale."""
    weight_growth: float = 1.0
    """Weight norm at the failing step over step 0's."""
    betas: tuple = (0.0, 0.9)
    """Optimizer betas as configured (momentum is betas[0] for sgd and rmsprop)."""
    weight_decay: float = 0.0
    """Optimizer weight decay as configured."""
    gp_weight: float = 10.0
    """Penalty weight as configured (lambda for wgan-gp, gamma for r1)."""
    step_name: str | None = None
    """Name of the user's critic step function (loss.step), for the snippets' calls."""
    framework: Framework = Framework.TORCH
    """What the models are written in: the snippets are in its terms."""
    error: ReplayError | None = None
    """What the replay raised (status error), or None."""

    def phases(self) -> set:
        return {f.phase for f in (self.issue, self.nonfinite, self.collapse) if f is not None}

    def path(self) -> tuple[ChainOp, ...]:
        """The chain with casts, copies and reshapes left out."""
        return tuple(x for x in self.chain if not x.cast)

    def end(self) -> ChainOp | None:
        return self.chain[-1] if self.chain else None

    def kinds(self) -> set:
        return {f.kind for f in (self.issue, self.nonfinite, self.collapse) if f is not None and f.kind is not None}

    def worst_init(self) -> tuple[str, float]:
        if not self.init_ratios:
            return "", 1.0
        return max(self.init_ratios.items(), key=lambda kv: max(kv[1], 1 / kv[1] if kv[1] else 0))


@dataclass(frozen=True)
class Apply:
    """How nanprobe applies a fix itself: config overrides that a replay (--verify-fix) can run."""

    overrides: tuple[tuple[str, object], ...]
    """(dotted config key, value) pairs; a value "{name}" takes the finding's typed value (module path, lr)."""
    builtin_only: bool = False
    """Reaches only the built-in losses: a custom loss.step needs the code change instead."""


@dataclass(frozen=True)
class Variant:
    """A fix as another framework writes it (the scoring and the config change stay the entry's)."""

    snippet: str
    """Code in that framework's terms, with the same {placeholders}."""
    title: str | None = None
    """The title, when the entry's names a PyTorch API."""
    why: str | None = None
    """The mechanism, when the entry's explains it in PyTorch terms."""


@dataclass(frozen=True)
class Fix:
    """A catalogue entry."""

    id: str
    """Stable id."""
    title: str
    """One line."""
    why: str
    """The mechanism."""
    snippet: str
    """Code, with {placeholders} filled from the finding."""
    apply: Apply | None
    """The config change that applies it, or None when it needs a code change."""
    score: Callable[[FixContext], float]
    """How strongly a finding points at this fix (0: not at all)."""
    when: str = ""
    """The findings `score` points at, in words (the generated fix catalogue shows it)."""
    variants: dict = field(default_factory=dict)
    """Framework -> Variant for models not written in PyTorch; None: the fix does not exist there."""


_SINGULAR = frozenset({"sqrt", "rsqrt", "div", "div_", "reciprocal", "pow", "norm", "linalg_vector_norm"})
_LOGS = frozenset({"log", "log1p", "binary_cross_entropy", "binary_cross_entropy_backward"})
_SIGN_FLIPS = frozenset({"rsub", "neg", "sub", "mul"})  # 1 - sigmoid(x), -sigmoid(x): still the sigmoid's values
_EXPS = frozenset({"exp", "exp_", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp2", "expm1"})


def _fed_by_sigmoid(c: FixContext, path: tuple[ChainOp, ...], i: int) -> bool:
    """The op at path[i] takes sigmoid's values (through casts, 1 - s, -s), on the path or feeding its origin."""
    j = i - 1
    while j >= 0 and path[j].op in _SIGN_FLIPS:
        j -= 1
    if j >= 0:
        return path[j].op == "sigmoid"
    return any(x.op == "sigmoid" for x in c.feeds)


def _singular_at_zero(x: ChainOp) -> bool:
    """An op (or its backward) that is infinite at 0: sqrt, rsqrt, a fractional power, a division, log."""
    if x.node in _NORM_NODES or x.node in ("DivBackward0", "ReciprocalBackward0"):
        return True
    if x.op == "pow":
        return any(0 < s < 1 for s in x.scalars) or not x.scalars
    return x.op in _SINGULAR


def _eps_failed(c: FixContext) -> bool:
    """A zero reached an op infinite at 0 while the eps meant to keep it away rounded to 0."""
    return any(x.lost_eps is not None for x in c.chain)


def _eps_kept(c: FixContext) -> bool:
    return any(x.kept_eps is not None for x in c.chain)


def _amp_low(c: FixContext) -> bool:
    return c.precision.is_low and c.mode is Mode.AMP


def _penalty_hit(c: FixContext) -> float:
    if c.penalty_fp32 or not (_amp_low(c) and not c.gp_fp32 and Phase.INPUT_GRAD in c.phases()):
        return 0.0
    return 92.0


def _safe_norm(c: FixContext) -> float:
    end = c.end()
    if end is not None and end.phase is Phase.OPTIMIZER:
        return 0.0  # the optimizer's own eps: adam-eps
    if c.status not in (Status.NAN, Status.OVERFLOW):
        return 0.0
    if end is not None and end.nonfinite and _singular_at_zero(end):
        if _eps_failed(c):
            return 97.0  # the eps is there but rounds to 0: one that survives the dtype
        if _eps_kept(c):
            return 0.0  # guarded already
        if any(x.zeroed for x in c.chain + c.feeds) or end.node in _NORM_NODES:
            return 90.0 if c.fp32_ok else 97.0
        return 0.0
    hit = any(n in c.chain_nodes for n in _NORM_NODES) or (
        c.nonfinite is not None and (c.nonfinite.node or "") in _NORM_NODES)
    if not hit or c.status is not Status.NAN or _eps_kept(c):
        return 0.0
    return 90.0 if c.fp32_ok else 97.0


def _grad_scaler(c: FixContext) -> float:
    if c.grad_scaler or not c.precision.needs_loss_scaling or c.mode is not Mode.AMP:
        return 0.0
    i = c.issue
    if i is not None and i.kind is FindingKind.UNDERFLOW and i.phase is Phase.BACKWARD:
        return 93.0
    return 55.0 if Phase.INPUT_GRAD in c.phases() else 0.0


def _fp32_module(c: FixContext) -> float:
    i = c.issue
    if not c.precision.is_low or i is None or not i.module or i.module == "data" or i.module in c.fp32_modules:
        return 0.0
    if i.phase in (Phase.BACKWARD, Phase.INPUT_GRAD) and i.kind in (FindingKind.OVERFLOW, FindingKind.NAN):
        return 80.0  # the module's own backward (an InstanceNorm's double backward) overflows: in fp32 it does not
    if i.phase is not Phase.FORWARD:
        return 0.0
    if i.kind is FindingKind.UNDERFLOW and _eps_failed(c):
        return 90.0  # the module's own eps rounds to 0 in the dtype: in fp32 it survives
    return 85.0 if i.kind in (FindingKind.OVERFLOW, FindingKind.NAN) else 0.0


def _bf16(c: FixContext) -> float:
    if c.precision is not Precision.FP16 or c.status is Status.OK:
        return 0.0
    bf16 = c.other.get(Precision.BF16)
    if bf16 is not None and bf16 is not Status.OK:
        return 0.0
    if c.error is not None and bf16 is not Status.OK:
        # an op that raises in fp16 (no kernel for the dtype) may well raise in bf16: only a bf16 replay says
        return 0.0
    base = 84.0 if FindingKind.OVERFLOW in c.kinds() else 70.0
    return base if bf16 is Status.OK else base - 20


def _grad_clip(c: FixContext) -> float:
    i = c.issue
    if c.grad_clip is not None or i is None or i.kind is FindingKind.UNDERFLOW:
        return 0.0
    if i.phase in (Phase.BACKWARD, Phase.OPTIMIZER):
        return 65.0 if i.step > 0 else 45.0
    return 30.0 if i.step > 0 else 0.0


def _eps_lost(c: FixContext) -> bool:
    if c.mode is not Mode.HALF or not c.precision.is_low or c.optimizer == "sgd":
        return False
    import torch

    return float(torch.tensor(c.eps, dtype=c.precision.torch_dtype)) == 0.0


def _adam_eps(c: FixContext) -> float:
    end = c.end()
    if end is not None and end.phase is Phase.OPTIMIZER and end.op in ("addcdiv", "addcdiv_") and _eps_failed(c):
        return 95.0
    return 95.0 if Phase.OPTIMIZER in c.phases() and _eps_lost(c) else 0.0


def _master_weights(c: FixContext) -> float:
    if c.mode is not Mode.HALF or not c.precision.is_low or Phase.OPTIMIZER not in c.phases():
        return 0.0
    return 96.0 if c.issue is not None and c.issue.kind is FindingKind.UNDERFLOW else 90.0


def _lower_lr(c: FixContext) -> float:
    i = c.issue
    if i is None or i.kind is FindingKind.UNDERFLOW or i.step == 0 or i.phase is Phase.DATA:
        return 0.0
    return 97.0 if c.weight_growth >= DIVERGENCE_GROWTH else 75.0


def _gp_scaled(c: FixContext) -> float:
    if c.penalty_fp32:
        return 0.0  # the penalty is computed in fp32 outside autocast: nothing to scale
    if c.unscaled_penalty and c.precision.needs_loss_scaling and (
            c.collapse is not None or Phase.INPUT_GRAD in c.phases() or c.status is not Status.OK):
        return 96.0  # a scaler is on but the penalty bypasses it: the recipe is the fix
    return _penalty_hit(c) - 4 if _penalty_hit(c) else 0.0


def _scale_collapse(c: FixContext) -> float:
    return 80.0 if c.collapse is not None else 0.0


def _init(c: FixContext) -> float:
    i = c.issue
    if i is None or i.phase not in (Phase.FORWARD, Phase.BACKWARD, Phase.INPUT_GRAD):
        return 0.0
    _, ratio = c.worst_init()
    if ratio >= INIT_FACTOR and i.kind in (FindingKind.OVERFLOW, FindingKind.NAN):
        return 96.0
    if init_off_scale(ratio) and ratio < 1 and i.kind is FindingKind.UNDERFLOW:
        return 60.0
    return 0.0


def _fp32_op(c: FixContext) -> float:
    cul = c.culprit
    if cul is None or not c.precision.is_low or cul.dtype not in ("float16", "bfloat16"):
        return 0.0
    if cul.op in _EXPS and cul.nonfinite:
        return 88.0  # exp / softmax of logits above log(max): in fp32, or scale the logits
    end = c.end()
    if end is not None and end.phase is not Phase.OPTIMIZER and end.nonfinite and _singular_at_zero(end) \
            and _eps_failed(c):
        return 80.0
    return 0.0


def _data(c: FixContext) -> float:
    if c.issue is not None and c.issue.phase is Phase.DATA:
        return 100.0
    # A constant image's (x - min) / (max - min) is 0/0 in every precision: when fp32 fails too and the
    # replayed samples hold constant or non-finite images, the data is the cause, wherever the NaN appears.
    bad = {DataProblem.NONFINITE.value, DataProblem.CONSTANT.value} & set(c.data_problems)
    fp32 = c.status if c.precision is Precision.FP32 else c.other.get(Precision.FP32)
    if bad and fp32 in (Status.NAN, Status.OVERFLOW) and c.status in (Status.NAN, Status.OVERFLOW):
        return 95.0
    return 0.0


def _op_name(op: str | None) -> str:
    """binary_cross_entropy for aten.binary_cross_entropy.default and torch.nn.functional.binary_cross_entropy."""
    if not op:
        return ""
    return op.split(".")[1] if op.startswith("aten.") else op.rsplit(".", 1)[-1]


def _logits(c: FixContext) -> float:
    e = c.error
    if e is not None and _op_name(e.op) == "binary_cross_entropy" and "autocast" in e.message:
        return 99.0  # autocast refuses BCE on probabilities (CUDA's lists): the logits form is its own fix
    path = c.path()
    for i, x in enumerate(path):
        if x.op.startswith("binary_cross_entropy") and "with_logits" not in x.op:
            return 98.0
        if x.op in _LOGS and _fed_by_sigmoid(c, path, i):
            return 98.0
    cul = c.culprit
    if cul is not None and cul.op in ("exp", "exp_") and cul.nonfinite:
        nxt = [x.op for x in c.after if not x.cast][:2]
        if nxt and (nxt[0] in _LOGS or (nxt[0] in ("add", "add_") and len(nxt) > 1 and nxt[1] in _LOGS)):
            return 98.0  # log(1 + exp(x)) is softplus(x)
    for f in (c.issue, c.nonfinite):
        if f is not None and f.op.startswith("aten.log") and any(
                p.startswith("aten.sigmoid") for p in f.numbers.get("producer_ops", ())):
            return 98.0
    return 0.0


CATALOGUE: tuple[Fix, ...] = (
    Fix("data", "Clean the data: drop non-finite and constant samples, and normalise to data.range",
        "A NaN or Inf in the batch, or a constant image divided by its zero std (per-image normalisation), "
        "poisons every op after it in every precision; data outside the range the model expects (0..255 "
        "where [-1, 1] is expected) scales every activation up to 255x. No change to the model helps.",
        "x = torch.as_tensor(batch).float()\n"
        "flat = x.flatten(1)\n"
        "bad = ~torch.isfinite(flat).all(1)           # non-finite samples: {bad_samples}\n"
        "constant = flat.amax(1) == flat.amin(1)      # constant images: {constant_samples}\n"
        "x = x[~(bad | constant)]\n"
        "{normalise}",
        None, _data,
        when="NaN or Inf in the batch (phase data; fp32 fails too); a run that fails in fp32 too while the "
             "replayed samples hold non-finite or constant images; or what check-data finds: non-finite or "
             "constant samples, values outside data.range",
        variants={Framework.KERAS: Variant(
        "x = np.asarray(batch, dtype=\"float32\")      # channels-last, as Keras has it\n"
        "flat = x.reshape(len(x), -1)\n"
        "bad = ~np.isfinite(flat).all(1)               # non-finite samples: {bad_samples}\n"
        "constant = flat.max(1) == flat.min(1)        # constant images: {constant_samples}\n"
        "x = x[~(bad | constant)]\n"
        "{normalise}")}),
    Fix("logits-loss", "Use a logits loss (softplus, BCE-with-logits) instead of log(sigmoid(x)) or BCELoss",
        "sigmoid(x) rounds to exactly 0 or 1 in low precision for |x| above ~17 (fp16), so log gives -inf "
        "and the gradient NaN, and CUDA autocast refuses nn.BCELoss on probabilities for that reason; softplus "
        "and BCE-with-logits compute the same loss from the logits without the rounding.",
        "loss_real = F.softplus(-d_real).mean()   # = -log(sigmoid(d_real))\n"
        "loss_fake = F.softplus(d_fake).mean()    # = -log(1 - sigmoid(d_fake))\n"
        "# or, in place of nn.BCELoss() on torch.sigmoid(critic(x)):\n"
        "criterion = nn.BCEWithLogitsLoss()\n"
        "loss = criterion(critic(x), target)      # the logits, no sigmoid",
        None, _logits,
        when="log of a sigmoid gives -inf: sigmoid rounded to exactly 0 or 1 in low precision; or the step raised "
             "because autocast refuses binary_cross_entropy (nn.BCELoss) on probabilities",
        variants={Framework.KERAS: Variant(
        "loss_real = keras.ops.mean(keras.ops.softplus(-d_real))   # = -log(sigmoid(d_real))\n"
        "loss_fake = keras.ops.mean(keras.ops.softplus(d_fake))    # = -log(1 - sigmoid(d_fake))\n"
        "# or keras.losses.BinaryCrossentropy(from_logits=True), with no sigmoid on the critic's output",
        title="Use a logits loss (keras.ops.softplus) instead of log(sigmoid(x))")}),
    Fix("init", "Re-initialise the weights at the Glorot/He scale",
        "Weights far above the He scale multiply activations at every layer, so they leave the range of "
        "{low} within a few layers.",
        "# {init_module}: weight std {init_std}, He value {init_he} ({init_ratio}x)\n"
        "{init_call}\n"
        "# off the He scale: {init_flagged}; or re-initialise every layer:\n"
        "def init_weights(m):\n"
        "    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):\n"
        "        nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity=\"leaky_relu\")  # He init for LeakyReLU(0.2)\n"
        "        if m.bias is not None:\n"
        "            nn.init.zeros_(m.bias)\n\n"
        "critic.apply(init_weights)",
        Apply((("model.init", "he"),)), _init,
        when=f"overflow or NaN in the forward, input-grad or backward with a layer's weights "
             f">= {INIT_FACTOR:g}x the He scale; underflow with weights <= 1/{INIT_SMALL_FACTOR:g} of it",
        variants={Framework.KERAS: Variant(
        "# {init_module}: kernel std {init_std}, He value {init_he} ({init_ratio}x)\n"
        "{init_call}\n"
        "# off the He scale: {init_flagged}; or build the layers with a Glorot or He initialiser:\n"
        "layers.Conv2D(filters, 4, strides=2, padding=\"same\",\n"
        "              kernel_initializer=keras.initializers.HeNormal())     # He, for (Leaky)ReLU\n"
        "layers.Dense(units, kernel_initializer=keras.initializers.GlorotUniform())   # Keras's default",
        title="Re-initialise the kernels with keras.initializers.GlorotUniform or HeNormal")}),
    Fix("adam-eps", "Use an eps that survives the dtype (1e-4 in fp16)",
        "eps={eps} rounds to 0 in {low}, so m / (sqrt(v) + eps) divides by zero wherever v is 0 or tiny.",
        "opt = torch.optim.{opt_class}(critic.parameters(), {opt_args_eps})",
        Apply((("train.eps", 1.0e-4),)), _adam_eps,
        when="a problem in the optimizer step in half mode, with an optimizer eps that rounds to 0 in the dtype",
        variants={Framework.KERAS: Variant(
        "opt = keras.optimizers.{opt_class}(learning_rate={lr}, epsilon=1e-4)",
        title="Use an epsilon that survives the dtype (Adam(epsilon=1e-4) in float16)")}),
    Fix("master-weights", "Keep fp32 master weights; use autocast instead of .half()",
        "Updates below half an ulp of a {low} weight are rounded away and the optimizer state loses its "
        "small values; fp32 weights with autocast keep both.",
        "critic = critic.float()                 # weights and optimizer state in fp32\n"
        "opt = torch.optim.{opt_class}(critic.parameters(), {opt_args})\n"
        "with torch.autocast(device_type=real.device.type, dtype=torch.{dtype}):\n"
        "    loss = {step_call}{amp_backward}",
        Apply((("precision.mode", "amp"), ("train.grad_scaler", "{amp_scaler}"))), _master_weights,
        when="a problem in the optimizer step in half mode: lost updates, optimizer state flushed to 0",
        variants={Framework.KERAS: Variant(
        "keras.config.set_dtype_policy(\"mixed_{dtype}\")   # variables float32, layers compute in {dtype}\n"
        "critic = build_critic()                           # build the models after setting the policy\n"
        "opt = keras.optimizers.Adam(learning_rate={lr}, beta_1=0.0, beta_2=0.9)",
        title="Keep float32 variables: the mixed_{dtype} policy instead of {dtype}",
        why="Updates below half an ulp of a {low} variable are rounded away and the optimizer state loses its "
            "small values; a mixed policy keeps the variables in float32 and computes in {dtype}.")}),
    Fix("safe-norm", "Compute the gradient norm so its derivative is finite at 0",
        "d sqrt(s)/ds = 1 / (2 sqrt(s)) is inf at s = 0, and 0 * inf = NaN in the backward when a "
        "sample's gradient is all zero (as it is once it underflows).",
        "grad_norm = torch.linalg.vector_norm(grads.flatten(1), dim=1)   # zero subgradient at 0\n"
        "# or keep sqrt with an eps that survives {low}:\n"
        "grad_norm = torch.sqrt(grads.flatten(1).float().pow(2).sum(1) + {safe_eps})",
        Apply((("loss.gp_norm", "vector_norm"),), builtin_only=True), _safe_norm,
        when="NaN through the backward of the penalty's norm (SqrtBackward0, a vector-norm, pow or rsqrt "
             "backward)",
        variants={Framework.KERAS: Variant(
        "flat = keras.ops.reshape(grads, (keras.ops.shape(grads)[0], -1))\n"
        "sq = keras.ops.square(keras.ops.cast(flat, \"float32\"))\n"
        "grad_norm = keras.ops.sqrt(keras.ops.sum(sq, axis=1) + 1e-12)\n"
        "# the eps keeps sqrt's gradient finite at 0 (tf.norm's gradient there is NaN too)")}),
    Fix("gp-fp32", "Compute the gradient penalty outside autocast, in fp32",
        "Under {low} autocast the critic's input gradient is computed in {low} without loss scaling; values "
        "below {tiny} flush to 0, so the penalty sees a zero norm.",
        "{gp_fp32_code}",
        Apply((("loss.gp_precision", "fp32"),), builtin_only=True), _penalty_hit,
        when="a problem in the penalty's input gradient (phase input-grad) under low-precision autocast, with "
             "the penalty inside autocast",
        variants={Framework.KERAS: None}),
    Fix("gp-scaled", "Follow the AMP gradient-penalty recipe: scale before autograd.grad, unscale after",
        "Scaling the critic's output by the GradScaler's scale lifts the input gradient out of {low}'s "
        "underflow range; multiplying by 1/scale afterwards gives the true gradient for the penalty.",
        "scaler = torch.amp.GradScaler(real.device.type)\n"
        "scaled = torch.autograd.grad(scaler.scale(out), {gp_input}, torch.ones_like(out), create_graph=True)[0]\n"
        "grads = scaled * (1.0 / scaler.get_scale())\n"
        "with torch.autocast(device_type=real.device.type, dtype=torch.{dtype}):\n"
        "    {penalty_line}\n"
        "scaler.scale(loss + gp).backward(); scaler.step(opt); scaler.update()\n"
        "# nanprobe passes its scaler to a custom step that takes one:\n"
        "# def critic_step(critic, generator, real, z, scaler=None)",
        Apply((("train.grad_scaler", True),), builtin_only=True), _gp_scaled,
        when="the same as gp-fp32; first in fp16 when a GradScaler is on but the step's autograd.grad "
             "bypasses it (unscaled_penalty)",
        variants={Framework.KERAS: Variant(
        "scale = 2.0 ** 15   # or opt.dynamic_scale of your LossScaleOptimizer\n"
        "with tf.GradientTape() as tape:     # on the torch backend: torch.autograd.grad(out * scale, x_hat, ...)\n"
        "    tape.watch(x_hat)\n"
        "    out = critic(x_hat, training=True)\n"
        "    scaled = out * scale\n"
        "grads = tape.gradient(scaled, x_hat) / scale\n"
        "norm = keras.ops.norm(keras.ops.reshape(grads, (len(grads), -1)), axis=1)\n"
        "gp = lambda_gp * keras.ops.mean((norm - 1) ** 2)",
        title="Scale the penalty's gradient as LossScaleOptimizer scales the loss, then unscale it",
        why="LossScaleOptimizer scales the loss, not the tape gradient the penalty takes of the critic's output; "
            "that gradient is computed by the {low} layers unscaled and values below {tiny} flush to 0. Scaling "
            "the output first lifts them into range; dividing by the scale afterwards gives the true gradient.")}),
    Fix("scale-collapse", "Fix the op that overflows at every scale; loss scaling cannot",
        "GradScaler halves its scale and skips the step whenever a gradient is inf. An op that makes inf whatever "
        "the scale (here {collapse_at}; typically the penalty's sqrt backward at a zero norm, or an activation above "
        "{low}'s max) makes it skip every step while the scale falls toward 0 (apex#654). Apply the fix for that "
        "op (above); keep one scaler per network (G and D).",
        "scaler_d = torch.amp.GradScaler(real.device.type)   # the critic's own scaler\n"
        "scaler_d.scale(loss_d).backward()\n"
        "scaler_d.step(opt_d); scaler_d.update()\n"
        "if scaler_d.get_scale() < 1.0:   # collapsing: find the op that makes inf\n"
        "    print(\"scale collapsed:\", scaler_d.get_scale())",
        None, _scale_collapse,
        when="GradScaler's scale collapses: a step still skipped after the retries, every step skipped, or "
             "the scale below 1",
        variants={Framework.KERAS: Variant(
        "opt_d = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(learning_rate=1e-4))   # the critic's own\n"
        "grads = tape.gradient(opt_d.scale_loss(loss_d), critic.trainable_variables)\n"
        "opt_d.apply(grads, critic.trainable_variables)   # skips the step on inf and halves the scale\n"
        "if float(opt_d.dynamic_scale) < 1.0:   # collapsing: find the op that makes inf\n"
        "    print(\"scale collapsed:\", float(opt_d.dynamic_scale))")}),
    Fix("grad-scaler", "Use dynamic loss scaling (torch.amp.GradScaler)",
        "Without loss scaling, gradients below {tiny} flush to 0 in {low} and those weights stop learning; "
        "the scaler multiplies the loss so the gradients stay in range, then unscales them.",
        "scaler = torch.amp.GradScaler(real.device.type)\n"
        "with torch.autocast(device_type=real.device.type, dtype=torch.{dtype}):\n"
        "    loss = {step_call}\n"
        "scaler.scale(loss).backward()\n"
        "scaler.unscale_(opt)      # before clipping or reading gradients\n"
        "scaler.step(opt)\n"
        "scaler.update()",
        Apply((("train.grad_scaler", True),)), _grad_scaler,
        when="parameter gradients underflow in the backward under fp16 autocast without loss scaling (also "
             "suggested, lower, for an input-grad problem)",
        variants={Framework.KERAS: Variant(
        "opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(learning_rate={lr}))\n"
        "# model.compile(...) wraps the optimizer itself under mixed_float16; a custom train_step does:\n"
        "grads = tape.gradient(opt.scale_loss(loss), critic.trainable_variables)\n"
        "opt.apply(grads, critic.trainable_variables)   # unscales, and skips the step on inf",
        title="Use dynamic loss scaling (keras.optimizers.LossScaleOptimizer)")}),
    Fix("fp32-module", "Run {module} in fp32 (or clamp its activations)",
        "{module} produces values beyond {low}'s max ({max}); running it outside autocast keeps them finite, "
        "and clamping (StyleGAN2-ADA's conv_clamp=256) keeps the rest of the network in range.",
        "class FP32(nn.Module):\n"
        "    def __init__(self, m):\n"
        "        super().__init__()\n"
        "        self.m = m\n\n"
        "    def forward(self, x):\n"
        "        with torch.autocast(device_type=x.device.type, enabled=False):\n"
        "            return self.m(x.float())\n\n"
        "{attr} = FP32({attr})\n"
        "# or clamp its output: x = x.clamp(-256, 256)",
        Apply((("precision.fp32_modules", "{module_fp32}"),)), _fp32_module,
        when="overflow or NaN in a module's forward in a low precision, that module not already in "
             "precision.fp32_modules",
        variants={Framework.KERAS: Variant(
        "layers.Conv2D(..., dtype=\"float32\", name=\"{layer_name}\")   # where you build {module}\n"
        "# or on the built model (its variables are float32 already under a mixed policy):\n"
        "{layer_attr}.dtype_policy = \"float32\"\n"
        "# or clamp its output: x = keras.ops.clip(x, -256, 256)",
        title="Run {module} in float32 (or clamp its activations)",
        why="{module} produces values beyond {low}'s max ({max}); a float32 dtype policy for that layer keeps "
            "them finite, and clamping (StyleGAN2-ADA's conv_clamp=256) keeps the rest of the network in range.")}),
    Fix("fp32-op", "Compute {culprit_op} in fp32 (or scale its input)",
        "{culprit_op} is computed in {low} here: {culprit_why}. Casting its input to float32 for that op keeps "
        "the rest of the step in {low}.",
        "{culprit_snippet}",
        None, _fp32_op,
        when="the root cause is one op (exp, pow, a division) whose result leaves the low dtype's range; "
             "computing that op in fp32 keeps the rest of the step in the low precision"),
    Fix("bf16", "Train in bf16 instead of fp16",
        "bf16 has fp32's exponent range (max 3.4e38, normals down to 1.2e-38), so neither the overflow at "
        "65504 nor the underflow below 6.1e-5 happens, and no loss scaling is needed.",
        "with torch.autocast(device_type=real.device.type, dtype=torch.bfloat16):\n"
        "    loss = {step_call}\n"
        "loss.backward()   # no GradScaler needed",
        Apply((("precision.dtypes", ["bf16"]),)), _bf16,
        when="fp16 fails and bf16 is ok (ranked lower when bf16 was not replayed)",
        variants={Framework.KERAS: Variant(
        "keras.config.set_dtype_policy(\"mixed_bfloat16\")   # before building the models\n"
        "critic = build_critic()\n"
        "# no LossScaleOptimizer needed",
        title="Train under mixed_bfloat16 instead of mixed_float16")}),
    Fix("lower-lr", "Lower the learning rate",
        "The first steps are fine and a later one fails: the updates grow the weights until activations "
        "leave the dtype's range.",
        "opt = torch.optim.{opt_class}(critic.parameters(), {opt_args_low_lr})",
        Apply((("train.lr", "{lr_low}"),)), _lower_lr,
        when=f"an overflow or NaN first found after step 0; first when the weights grew by "
             f"{DIVERGENCE_GROWTH - 1:.0%} or more by then",
        variants={Framework.KERAS: Variant(
        "opt = keras.optimizers.{opt_class}(learning_rate={lr_low})   # WGAN-GP: Adam, 1e-4, beta_1=0.0, beta_2=0.9\n"
        "# the TensorFlow answer also adds weight_decay=1e-5:\n"
        "# it slows the weights' growth, it does not bound a step")}),
    Fix("grad-clip", "Clip the gradient norm (after unscaling)",
        "A single large gradient makes a huge update; clipping bounds the step while the cause is fixed.",
        "scaler.unscale_(opt)   # if you use a GradScaler\n"
        "torch.nn.utils.clip_grad_norm_(critic.parameters(), max_norm=10.0)",
        Apply((("train.grad_clip", 10.0),)), _grad_clip,
        when="overflow or NaN with no clipping set, in the backward or the optimizer step (most at later "
             "steps), or in the forward after step 0",
        variants={Framework.KERAS: Variant(
        "opt = keras.optimizers.{opt_class}(learning_rate={lr}, global_clipnorm=10.0)   # clips after unscaling",
        title="Clip the gradient norm (global_clipnorm)")}),
)

REGISTRY: dict[str, Fix] = {f.id: f for f in CATALOGUE}


def _vars(c: FixContext) -> dict:
    import torch

    low = c.precision if c.precision.is_low else Precision.FP16
    info = torch.finfo(low.torch_dtype)
    module = c.issue.module if c.issue is not None and c.issue.module not in ("", "data") else "critic"
    k = c.collapse
    collapse_at = (f"{k.op.removeprefix('aten.').rsplit('.', 1)[0]}{f' ({k.node})' if k.node else ''} in "
                   f"{k.module or 'no module'}") if k is not None else ""
    parts = module.split(".")
    attr = parts[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts[1:])
    init_module, init_ratio = c.worst_init()
    # The layer where the finding is, when it is off the He scale itself; else the worst one.
    at_issue = next((i for i in c.init_checks if i.flagged and c.issue is not None and i.module == c.issue.module),
                    None)
    if at_issue is not None:
        init_module, init_ratio = at_issue.module, at_issue.ratio
    worst = next((i for i in c.init_checks if i.module == init_module), None)
    flagged = [f"{i.module} ({i.ratio:.3g}x)" for i in c.init_checks if i.flagged]
    bad = c.issue.numbers.get("bad_samples") if c.issue is not None else None
    return {
        **_code_vars(c, low),
        "low": low.value, "dtype": {"fp16": "float16", "bf16": "bfloat16"}[low.value],
        "device": c.device, "tiny": f"{info.smallest_normal:.2g}", "max": f"{info.max:.6g}",
        "module": module, "attr": attr, "eps": f"{c.eps:g}", "lr": f"{c.lr:g}", "lr_low": f"{c.lr / 10:g}",
        "opt_class": {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "sgd": "SGD"}[c.optimizer],
        "init_module": init_module or "critic", "init_ratio": f"{init_ratio:.3g}",
        "bad_samples": ", ".join(map(str, bad)) if bad else "see the report",
        "constant_samples": "see nanprobe check-data", "normalise": _NORMALISE,
        "init_std": f"{worst.std:.3g}" if worst else "?", "init_he": f"{worst.he:.3g}" if worst else "?",
        "init_call": worst.call if worst else "nn.init.kaiming_normal_(layer.weight, a=0.2)",
        "init_flagged": (", ".join(flagged[:6]) + (f" and {len(flagged) - 6} more" if len(flagged) > 6 else "")
                         or "none"),
        "collapse_at": collapse_at, **_culprit_vars(c), "layer_name": module.rsplit("/", 1)[-1],
        "layer_attr": parts[0].split("/")[0] + "".join(f'.get_layer("{p}")' for p in module.split("/")[1:]),
    }


def _lit(x: float) -> str:
    """A hyper-parameter as Python source, exactly as configured (0.9905854 stays 0.9905854)."""
    return repr(float(x))


# torch's own defaults, so a snippet spells out only what the config changes (AdamW decays by 0.01).
_OPT_DEFAULTS = {"adam": {"eps": 1e-8, "weight_decay": 0.0}, "adamw": {"eps": 1e-8, "weight_decay": 0.01},
                 "rmsprop": {"eps": 1e-8, "weight_decay": 0.0}, "sgd": {"weight_decay": 0.0}}


def _opt_args(c: FixContext, lr: float | None = None, eps: float | None = None) -> str:
    """The optimizer's arguments with the configured hyper-parameters (lr, betas, eps, weight decay)."""
    args = [f"lr={_lit(c.lr if lr is None else lr)}"]
    b0, b1 = (tuple(c.betas) + (0.9, 0.999))[:2]
    if c.optimizer in ("adam", "adamw"):
        args.append(f"betas=({_lit(b0)}, {_lit(b1)})")
    elif b0:
        args.append(f"momentum={_lit(b0)}")
    defaults = _OPT_DEFAULTS[c.optimizer]
    e = c.eps if eps is None else eps
    if "eps" in defaults and (eps is not None or e != defaults["eps"]):
        args.append(f"eps={_lit(e)}")
    if c.weight_decay != defaults["weight_decay"]:
        args.append(f"weight_decay={_lit(c.weight_decay)}")
    return ", ".join(args)


# The loss of each built-in kind, as the snippets call it (a custom step is called by its own name).
_LOSS_CALL = {"wgan-gp": "critic(fake).mean() - critic(real).mean() + gp",
              "r1": "F.softplus(critic(fake)).mean() + F.softplus(-critic(real)).mean() + r1",
              "hinge": "F.relu(1 - critic(real)).mean() + F.relu(1 + critic(fake)).mean()",
              "non-saturating": "F.softplus(-critic(real)).mean() + F.softplus(critic(fake)).mean()"}


def _penalty_code(c: FixContext) -> tuple[str, str, str]:
    """(input name, the penalty's last line, the penalty computed outside autocast) for the loss kind."""
    weight = _lit(c.gp_weight) if c.loss_kind != "custom" else "lambda_gp"
    if c.loss_kind == "r1":
        last = f"r1 = {weight} / 2 * grads.flatten(1).pow(2).sum(1).mean()"
        return "x", last, (
            "with torch.autocast(device_type=real.device.type, enabled=False):\n"
            "    x = real.detach().float().requires_grad_(True)\n"
            "    out = critic(x)\n"
            "    grads = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0]\n"
            f"    {last}")
    last = f"gp = {weight} * ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()"
    return "x_hat", last, (
        "with torch.autocast(device_type=real.device.type, enabled=False):\n"
        "    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)\n"
        "    x_hat = (alpha * real + (1 - alpha) * fake).float().requires_grad_(True)\n"
        "    out = critic(x_hat)\n"
        "    grads = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)[0]\n"
        f"    {last}")


def _code_vars(c: FixContext, low: Precision) -> dict:
    """Code fragments that carry the user's configured hyper-parameters, loss kind and names."""
    gp_input, last, gp_fp32 = _penalty_code(c)
    step_call = (f"{c.step_name}(critic, generator, real, z)" if c.loss_kind == "custom" and c.step_name
                 else _LOSS_CALL.get(c.loss_kind, "critic_loss(critic, real, fake)"))
    return {"opt_args": _opt_args(c), "opt_args_eps": _opt_args(c, eps=1e-4),
            "opt_args_low_lr": _opt_args(c, lr=c.lr / 10), "gp_input": gp_input, "penalty_line": last,
            "gp_fp32_code": gp_fp32, "step_call": step_call, "safe_eps": _lit(SAFE_EPS[low.value]),
            "amp_backward": ("\nscaler.scale(loss).backward()   # scaler = torch.amp.GradScaler(): fp16 needs it"
                             "\nscaler.step(opt)\nscaler.update()" if low.needs_loss_scaling else "")}


_OP_SNIPPETS = {
    "exp": "y = torch.exp(x.float())            # or: x = x - x.amax(dim, keepdim=True) before exp",
    "softmax": "p = torch.softmax(logits, dim=-1, dtype=torch.float32)   # or scale q by 1/sqrt(d) first",
    "_softmax": "p = torch.softmax(logits, dim=-1, dtype=torch.float32)   # or scale q by 1/sqrt(d) first",
    "log_softmax": "p = torch.log_softmax(logits, dim=-1, dtype=torch.float32)",
    "_log_softmax": "p = torch.log_softmax(logits, dim=-1, dtype=torch.float32)",
    "rsqrt": "y = x * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + 1e-8).to(x.dtype)",
    "sqrt": "n = torch.sqrt(s.float() + 1e-12)",
}


def _culprit_vars(c: FixContext) -> dict:
    cul = c.culprit
    end = c.end()
    target = cul if cul is not None and cul.nonfinite else end
    op = target.op if target is not None else "the op"
    if target is not None and target.nonfinite and op in ("exp", "exp_", "softmax", "_softmax"):
        why = f"its input is above log({'65504' if target.dtype == 'float16' else '3.4e38'}) and it overflows"
    elif _eps_failed(c):
        eps = next(x.lost_eps for x in c.chain if x.lost_eps is not None)
        why = f"the eps {eps:g} meant to keep it away from 0 rounds to 0 in {target.dtype if target else 'fp16'}"
    else:
        why = "it leaves the dtype's range"
    snippet = _OP_SNIPPETS.get(op, f"y = torch.{op.rstrip('_')}(x.float())   # then .to(x.dtype) if needed")
    return {"culprit_op": op, "culprit_why": why, "culprit_snippet": snippet}


def amp_scaler(precision: Precision, scaler_on: bool) -> bool | None:
    """train.grad_scaler for autocast with fp32 weights: True where the precision still needs its loss scaled
    (fp16) and no GradScaler is on; None leaves the setting as it is."""
    return True if precision.needs_loss_scaling and not scaler_on else None


def _typed(c: FixContext) -> dict:
    """Values an Apply's "{name}" placeholders take, typed as the config expects them."""
    module = c.issue.module if c.issue is not None and c.issue.module not in ("", "data") else "critic"
    return {"module": module, "lr_low": c.lr / 10, "module_fp32": [*c.fp32_modules, module],
            "amp_scaler": amp_scaler(c.precision, c.grad_scaler)}


def filled(pairs: tuple[tuple[str, object], ...], typed: dict) -> dict:
    """(dotted key, value) pairs as config overrides: a "{name}" value takes typed[name]; a None leaves its key out."""

    def fill(v):
        if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
            return typed[v[1:-1]]
        return [fill(x) for x in v] if isinstance(v, list) else v

    out = {key: fill(value) for key, value in pairs}
    return {key: value for key, value in out.items() if value is not None}


def overrides(apply: Apply, c: FixContext) -> dict:
    """The dotted config overrides an Apply makes for this finding."""
    return filled(apply.overrides, _typed(c))


def _yaml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    return str(v)


def describe(changes: dict) -> str | None:
    """The overrides as the config lines a user would write ("loss.gp_precision: fp32")."""
    return "; ".join(f"{k}: {_yaml(v)}" for k, v in changes.items()) or None


_NORMALISE = "# then bring x to data.range (x / 127.5 - 1 maps uint8 to [-1, 1])"


def adapt(fix_id: str, **values: str) -> FixSuggestion:
    """A catalogue entry with its placeholders filled from `values` (outside a replay, e.g. check-data)."""
    fix = REGISTRY[fix_id]
    v = {"normalise": _NORMALISE, **values}
    return FixSuggestion(fix.id, fix.title.format(**v), fix.why.format(**v), fix.snippet.format(**v),
                         None)


def adapted(c: FixContext) -> tuple[FixSuggestion, ...]:
    """Every catalogue entry adapted to the context, scored or not (what each snippet would say)."""
    v = _vars(c)
    return tuple(FixSuggestion(f.id, f.title.format(**v), f.why.format(**v), f.snippet.format(**v)) for f in CATALOGUE)


def rank(c: FixContext, limit: int = 5) -> tuple[FixSuggestion, ...]:
    """The fixes the finding points at, best first, adapted to it."""
    if c.issue is None and c.nonfinite is None and c.collapse is None and c.error is None:
        return ()
    scored = []
    for i, fix in enumerate(CATALOGUE):
        if fix.variants.get(c.framework, fix) is None:
            continue  # no such fix in the models' framework
        s = fix.score(c)
        if s <= 0:
            continue
        if not c.fp32_ok and fix.id in _PRECISION_FIXES:
            s *= 0.3  # fp32 fails too: the precision is not the cause
        scored.append((-s, i, fix))
    v = _vars(c)
    out = []
    for _, _, fix in sorted(scored)[:limit]:
        reaches = fix.apply is not None and not (fix.apply.builtin_only and c.loss_kind == "custom")
        changes = overrides(fix.apply, c) if reaches else {}  # type: ignore[arg-type]  # not None on this path
        variant = fix.variants.get(c.framework) or Variant(fix.snippet)
        title, why = variant.title or fix.title, variant.why or fix.why
        out.append(FixSuggestion(fix.id, title.format(**v), why.format(**v), variant.snippet.format(**v),
                                 describe(changes), overrides=changes))
    return tuple(out)
