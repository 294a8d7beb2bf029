"""YAML numbers as users write them.

PyYAML implements YAML 1.1, where a float needs a dot: `lr: 1e-4` and `eps: 5e-5` are read as the
strings "1e-4" and "5e-5". YAML 1.2's core schema reads them as numbers, and so does every config a
user copies from a paper or another tool. `Loader` is PyYAML's safe loader with YAML 1.2's float rule
added in front of 1.1's; everything else (ints, bools, nulls, safety) is the safe loader's.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_INT = re.compile(r"^[-+]?[0-9]+$")


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads YAML 1.2 floats such as 1e-4 as numbers."""


# Resolvers are tried in order; an int stays an int because the 1.1 int rule is kept ahead of this one.
Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+.0123456789":
    _rules = Loader.yaml_implicit_resolvers.setdefault(_first, [])
    _rules[:] = [r for r in _rules if r[0] != "tag:yaml.org,2002:float"]
    _rules.append(("tag:yaml.org,2002:float", _FLOAT_12))


def _float(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = loader.construct_scalar(node)
    if _INT.match(text):
        return int(text)
    return loader.construct_yaml_float(node)


Loader.add_constructor("tag:yaml.org,2002:float", _float)


def load(text: str) -> Any:
    """Parse one YAML document with YAML 1.2 floats; raises yaml.YAMLError like yaml.safe_load."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
