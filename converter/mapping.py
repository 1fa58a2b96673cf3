"""Load, validate and apply the declarative key-mapping tables (YAML).

A mapping file looks like::

    version: 1
    name: cogvideox_vae            # optional
    description: ...               # optional
    rules:
      - name: causal_conv3d_weight
        source: "{scope}.{conv}.conv.weight"     # diffusers state-dict key template
        target: "{scope}.{conv}.conv.kernel"     # dotted NNX parameter path template
        transform: conv3d_oithw_to_thwio         # name in transforms.TRANSFORMS
        where:                                   # placeholder -> regex
          scope: '(?:encoder|decoder)(?:\\.[A-Za-z0-9_]+)*'
          conv: 'conv_in|conv_out|conv1|conv2|conv_y|conv_b'
        description: ...                         # optional

Rules are bidirectional: each template compiles to an anchored regex, so a key can be
mapped source -> target (``Mapping.forward_key``) and target -> source
(``Mapping.reverse_key``). The schema is checked at load time; every error names the file,
the rule (index and name) and what is wrong, and all errors of a file are reported together
in one :class:`MappingError`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .transforms import TRANSFORMS, Transform

__all__ = [
    "DEFAULT_MAPPING",
    "MappingError",
    "KeyMatchError",
    "Rule",
    "Mapping",
    "load_mapping",
    "default_mapping_path",
]

#: resource name of the packaged CogVideoX VAE mapping (in ``cogvae.mappings``)
DEFAULT_MAPPING = "cogvideox_vae.yaml"

_TOP_REQUIRED = {"version", "rules"}
_TOP_OPTIONAL = {"name", "description"}
_RULE_REQUIRED = {"name", "source", "target", "transform"}
_RULE_OPTIONAL = {"where", "description"}
_SUPPORTED_VERSIONS = {1}
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class MappingError(ValueError):
    """A mapping file is malformed. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in mapping:\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


class KeyMatchError(KeyError):
    """A key matched no rule, or more than one rule."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def _parse_template(template: str) -> list[tuple[str, str]]:
    """Split a template into ``[("lit", text) | ("ph", name), ...]``; raise ValueError."""
    parts: list[tuple[str, str]] = []
    i, n = 0, len(template)
    lit: list[str] = []
    while i < n:
        c = template[i]
        if c == "{":
            j = template.find("}", i + 1)
            if j < 0:
                raise ValueError(f"unclosed '{{' at position {i}")
            name = template[i + 1 : j]
            if not _PLACEHOLDER_NAME.match(name):
                raise ValueError(f"bad placeholder name {{{name}}} at position {i}")
            if lit:
                parts.append(("lit", "".join(lit)))
                lit = []
            parts.append(("ph", name))
            i = j + 1
        elif c == "}":
            raise ValueError(f"unmatched '}}' at position {i}")
        else:
            lit.append(c)
            i += 1
    if lit:
        parts.append(("lit", "".join(lit)))
    if not parts:
        raise ValueError("empty template")
    names = [v for k, v in parts if k == "ph"]
    dups = sorted({x for x in names if names.count(x) > 1})
    if dups:
        raise ValueError(f"placeholder(s) used more than once: {', '.join(dups)}")
    for (k1, _), (k2, _) in zip(parts, parts[1:]):
        if k1 == k2 == "ph":
            raise ValueError("two placeholders must be separated by literal text")
    return parts


@dataclass(frozen=True)
class _Template:
    text: str
    parts: tuple[tuple[str, str], ...]
    regex: re.Pattern

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.parts if k == "ph")

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        return {name: m.group(name) for name in self.placeholders}

    def fill(self, values: dict[str, str]) -> str:
        return "".join(values[v] if k == "ph" else v for k, v in self.parts)


def _compile_template(text: str, where: dict[str, str]) -> _Template:
    parts = _parse_template(text)
    pattern = "".join(
        f"(?P<{v}>{where[v]})" if k == "ph" else re.escape(v) for k, v in parts
    )
    return _Template(text, tuple(parts), re.compile(rf"\A(?:{pattern})\Z"))


@dataclass(frozen=True)
class Rule:
    """One bidirectional mapping rule (validated and compiled)."""

    name: str
    index: int
    source: str
    target: str
    transform: Transform
    where: dict[str, str]
    description: str = ""
    _source_t: _Template = field(repr=False, compare=False, default=None)
    _target_t: _Template = field(repr=False, compare=False, default=None)

    @property
    def inverse_transform(self) -> Transform:
        return TRANSFORMS[self.transform.inverse]

    @property
    def label(self) -> str:
        return f"rule #{self.index} {self.name!r}"

    def forward(self, source_key: str) -> str | None:
        """Target path for ``source_key`` if this rule matches it, else ``None``."""
        values = self._source_t.match(source_key)
        return None if values is None else self._target_t.fill(values)

    def reverse(self, target_path: str) -> str | None:
        """Source key for ``target_path`` if this rule matches it, else ``None``."""
        values = self._target_t.match(target_path)
        return None if values is None else self._source_t.fill(values)


class Mapping:
    """A validated, compiled set of rules plus the file it came from."""

    def __init__(self, rules: list[Rule], *, path: str, sha256: str, name: str = "",
                 description: str = "", version: int = 1):
        self.rules = list(rules)
        self.path = path
        self.sha256 = sha256
        self.name = name
        self.description = description
        self.version = version

    def __repr__(self) -> str:
        return f"Mapping({self.path!r}, {len(self.rules)} rules, sha256={self.sha256[:12]})"

    # -- matching: all matches (the engine collects zero/multi-match problems) --------
    def match_forward(self, source_key: str) -> list[tuple[str, Rule]]:
        out = []
        for rule in self.rules:
            t = rule.forward(source_key)
            if t is not None:
                out.append((t, rule))
        return out

    def match_reverse(self, target_path: str) -> list[tuple[str, Rule]]:
        out = []
        for rule in self.rules:
            s = rule.reverse(target_path)
            if s is not None:
                out.append((s, rule))
        return out

    # -- exactly-one matching ----------------------------------------------------------
    def _one(self, key: str, matches: list[tuple[str, Rule]], what: str):
        if not matches:
            raise KeyMatchError(f"{what} {key!r} matches no rule of mapping {self.path}")
        if len(matches) > 1:
            rules = ", ".join(r.label for _, r in matches)
            raise KeyMatchError(
                f"{what} {key!r} matches {len(matches)} rules of mapping {self.path}: {rules}"
            )
        return matches[0]

    def forward_key(self, source_key: str) -> tuple[str, Rule]:
        """diffusers key -> (dotted NNX path, rule). Raises KeyMatchError on 0 or >1 matches."""
        return self._one(source_key, self.match_forward(source_key), "source key")

    def reverse_key(self, target_path: str) -> tuple[str, Rule]:
        """dotted NNX path -> (diffusers key, rule). Raises KeyMatchError on 0 or >1 matches."""
        return self._one(target_path, self.match_reverse(target_path), "target path")


# ----------------------------------------------------------------------------------------
# loading / validation
# ----------------------------------------------------------------------------------------


def default_mapping_path() -> Path:
    """Filesystem path of the packaged ``cogvideox_vae.yaml``."""
    res = importlib.resources.files("cogvae.mappings") / DEFAULT_MAPPING
    return Path(str(res))


def provenance_entry(mapping: "Mapping") -> dict:
    """The mapping as ``provenance.json`` records it: its sha256, and its path, the packaged one
    by its package name (a path into site-packages or a clone says nothing about the mapping
    that its sha256 does not, and names a local user's folders in a pushed repo)."""
    path = str(mapping.path)
    try:
        if Path(path).resolve() == default_mapping_path().resolve():
            path = f"cogvae.mappings/{DEFAULT_MAPPING}"
    except (OSError, RuntimeError):  # not a file path (a parsed string): as it is
        pass
    return {"path": path, "sha256": mapping.sha256}


def _validate_rule(raw: Any, index: int, where_label: str, problems: list[str]) -> Rule | None:
    if not isinstance(raw, dict):
        problems.append(f"{where_label}: rule #{index} must be a mapping, got {type(raw).__name__}")
        return None
    name = raw.get("name")
    label = f"rule #{index} {name!r}" if isinstance(name, str) else f"rule #{index}"
    pfx = f"{where_label}: {label}"
    n_before = len(problems)

    for k in sorted(set(raw) - _RULE_REQUIRED - _RULE_OPTIONAL, key=str):
        problems.append(
            f"{pfx}: unknown field {k!r} (allowed: "
            f"{', '.join(sorted(_RULE_REQUIRED | _RULE_OPTIONAL))})"
        )
    for k in sorted(_RULE_REQUIRED - set(raw)):
        problems.append(f"{pfx}: missing field {k!r}")
    for k in ("name", "source", "target", "transform", "description"):
        if k in raw and not isinstance(raw[k], str):
            problems.append(f"{pfx}: field {k!r} must be a string, got {type(raw[k]).__name__}")
    if isinstance(name, str) and not name:
        problems.append(f"{pfx}: field 'name' must not be empty")

    transform = None
    tname = raw.get("transform")
    if isinstance(tname, str):
        transform = TRANSFORMS.get(tname)
        if transform is None:
            problems.append(
                f"{pfx}: unknown transform {tname!r} (known: {', '.join(sorted(TRANSFORMS))})"
            )

    where = raw.get("where", {})
    if where is None:
        where = {}
    if not isinstance(where, dict):
        problems.append(f"{pfx}: field 'where' must be a mapping of placeholder -> regex")
        where = {}
    good_where: dict[str, str] = {}
    for ph, rx in where.items():
        if not isinstance(ph, str) or not _PLACEHOLDER_NAME.match(ph):
            problems.append(f"{pfx}: where: bad placeholder name {ph!r}")
            continue
        if not isinstance(rx, str):
            problems.append(f"{pfx}: where: regex for {{{ph}}} must be a string, got {type(rx).__name__}")
            continue
        try:
            compiled = re.compile(rx)
        except re.error as e:
            problems.append(f"{pfx}: where: regex for {{{ph}}} does not compile: {rx!r}: {e}")
            continue
        if compiled.groupindex:
            problems.append(f"{pfx}: where: regex for {{{ph}}} must not define named groups: {rx!r}")
            continue
        if compiled.fullmatch(""):
            problems.append(f"{pfx}: where: regex for {{{ph}}} must not match the empty string: {rx!r}")
            continue
        good_where[ph] = rx

    templates: dict[str, list[tuple[str, str]]] = {}
    for k in ("source", "target"):
        text = raw.get(k)
        if not isinstance(text, str):
            continue
        try:
            templates[k] = _parse_template(text)
        except ValueError as e:
            problems.append(f"{pfx}: bad {k} template {text!r}: {e}")
            continue
        for v in (v for kind, v in templates[k] if kind == "ph"):
            if v not in where:
                problems.append(f"{pfx}: {k} template {text!r}: placeholder {{{v}}} is not defined in 'where'")
    if len(templates) == 2:
        src_ph = {v for kind, v in templates["source"] if kind == "ph"}
        tgt_ph = {v for kind, v in templates["target"] if kind == "ph"}
        if src_ph != tgt_ph:
            problems.append(
                f"{pfx}: source and target templates must use the same placeholders "
                f"(source: {sorted(src_ph)}, target: {sorted(tgt_ph)})"
            )
        unused = sorted(set(where) - src_ph - tgt_ph, key=str)
        if unused:
            problems.append(f"{pfx}: where defines unused placeholder(s): {', '.join(map(str, unused))}")

    if len(problems) > n_before:
        return None
    return Rule(
        name=name,
        index=index,
        source=raw["source"],
        target=raw["target"],
        transform=transform,
        where=dict(good_where),
        description=raw.get("description", ""),
        _source_t=_compile_template(raw["source"], good_where),
        _target_t=_compile_template(raw["target"], good_where),
    )


def parse_mapping(text: str | bytes, *, path: str = "<string>") -> Mapping:
    """Validate and compile mapping YAML text. Raises MappingError listing every problem."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    sha = hashlib.sha256(data).hexdigest()
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise MappingError([f"{path}: not valid YAML: {e}"]) from None
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise MappingError([f"{path}: top level must be a mapping with 'version' and 'rules'"])
    for k in sorted(set(doc) - _TOP_REQUIRED - _TOP_OPTIONAL, key=str):
        problems.append(f"{path}: unknown top-level field {k!r}")
    for k in sorted(_TOP_REQUIRED - set(doc)):
        problems.append(f"{path}: missing top-level field {k!r}")
    if "version" in doc and doc["version"] not in _SUPPORTED_VERSIONS:
        problems.append(f"{path}: unsupported version {doc['version']!r} (supported: 1)")
    raw_rules = doc.get("rules", [])
    if "rules" in doc and (not isinstance(raw_rules, list) or not raw_rules):
        problems.append(f"{path}: 'rules' must be a non-empty list")
        raw_rules = []

    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            nm = raw["name"]
            if nm in seen:
                problems.append(
                    f"{path}: rule #{i} {nm!r}: duplicate rule name (first used by rule #{seen[nm]})"
                )
            else:
                seen[nm] = i
        rule = _validate_rule(raw, i, path, problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise MappingError(problems)
    return Mapping(
        rules,
        path=path,
        sha256=sha,
        name=doc.get("name", "") or "",
        description=doc.get("description", "") or "",
        version=doc["version"],
    )


def load_mapping(path: str | Path | None = None) -> Mapping:
    """Load a mapping file; ``None`` loads the packaged ``cogvideox_vae.yaml``.

    The returned :class:`Mapping` carries ``.path`` (the file) and ``.sha256`` (of its bytes).
    """
    p = default_mapping_path() if path is None else Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MappingError([f"{p}: cannot read mapping file: {e}"]) from None
    return parse_mapping(data, path=str(p))
