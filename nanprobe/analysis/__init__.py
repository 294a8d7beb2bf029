"""The analysis: from replay traces to findings, comparisons, fixes and their verification."""
