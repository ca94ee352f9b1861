"""One-line messages every command writes about what a user typed: a close known name for a misspelt
one, a YAML error without PyYAML's caret lines. Here because curate (pipeline) and training share them
and both may import `manifests` (ARCHITECTURE.md: imports go one way)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`"; did you mean motion.min?"` for a misspelt setting close to a known one, else `""`."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def yaml_problem(exc: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where ("expected ',' or ']' at line 2,
    column 1"), not PyYAML's several lines with a caret; other errors as they are."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_yaml(text: str):
    """`yaml.safe_load`, except that a key given twice in one mapping is a `yaml.YAMLError` ("found
    duplicate key 'lr' at line 4, column 3"): PyYAML keeps the last one silently, so a config that sets
    `lr` twice ran with whichever came later and nobody was told."""
    import yaml

    class _NoDuplicateKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key overriding it is fine
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:  # a list as a key: PyYAML's own "found unhashable key" below
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=_NoDuplicateKeys)  # noqa: S506 - a SafeLoader subclass
