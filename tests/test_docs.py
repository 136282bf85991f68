"""The documentation site builds strictly, covers the public API, works offline and keeps its numbers.

``mkdocs build --strict`` turns every warning into an error: a broken link or anchor, a page missing
from the nav, a mkdocstrings reference to an object that does not exist. The build needs no network,
and neither does the built site: no script, style or font comes from another host, the maths is
typeset by a vendored MathJax, and diagrams are inline SVG. Each registered component's API entry
shows its real parameters and defaults; preset lists and line counts in the prose match the code.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# DESIGN.md §8: the public names other code, docs and checks rely on. Each must appear in docs/.
PUBLIC_NAMES = [
    *(f"rlcredit.{n}" for n in (
        "Rollout", "Credit", "LossOutput", "EstimatorOutput", "Strategy", "HFPolicy",
        "build", "register", "get", "available",
        "RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError",
    )),
    *(f"rlcredit.functional.{n}" for n in (
        "token_kl", "fused_token_kl", "token_entropy", "group_normalize", "top_fraction_mask",
    )),
    *(f"rlcredit_mm.{n}" for n in ("VisualKL", "AttentionConnectivity", "AnchorClusters")),
    "rlcredit demo", "rlcredit inspect",
]

# DESIGN.md §8: registered names, each written as `name` somewhere in docs/.
REGISTERED_NAMES = [
    "uniform", "signal", "entropy", "visual_kl", "attention_connectivity",                   # estimators
    "top_fraction", "threshold", "intersect", "union", "complement", "anchor_clusters",      # weighters
    "group_normalize", "group_center", "leave_one_out", "dependency_scale",                  # shapers
    "clipped_surrogate",                                                                     # losses
    "patch_blackout", "gaussian_noise", "constant", "blur", "drop",                          # perturbations
    "grpo", "dapo", "dr_grpo", "entropy_forks", "vppo", "vppo_paper", "at_rl",               # presets
    "soft", "stapo", "gspo",                                                                 # beyond §8
]

# The API reference (mkdocstrings) renders one anchor per documented object: each public name
# must have one, under the module that defines it.
API_ANCHORS = [
    *(f"rlcredit.{n}" for n in ("Rollout", "Credit", "LossOutput", "EstimatorOutput", "Strategy", "HFPolicy")),
    *(f"rlcredit.registry.{n}" for n in ("register", "get", "available")),
    "rlcredit.specs.build",
    *(f"rlcredit.errors.{n}" for n in ("RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError")),
    *(f"rlcredit.functional.{n}" for n in (
        "token_kl", "fused_token_kl", "token_entropy", "group_normalize", "top_fraction_mask",
    )),
    "rlcredit_mm.visual_kl.VisualKL",
    "rlcredit_mm.connectivity.AttentionConnectivity",
    "rlcredit_mm.anchors.AnchorClusters",
]


def _nav_pages(nav: object) -> list[str]:
    """Every page path in a mkdocs ``nav`` (nested lists of {title: path-or-list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _load_mkdocs_yml() -> dict:
    import yaml  # PyYAML: in the dev extra, and a dependency of mkdocs

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use `!!python/name:` tags (pymdownx fences) and `!relative` paths; their values do
    # not matter here.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    Loader.add_constructor("!relative", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))


def test_nav_pages_exist():
    config = _load_mkdocs_yml()
    pages = _nav_pages(config["nav"])
    assert pages, "mkdocs.yml has an empty nav"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages listed in mkdocs.yml nav but missing from docs/: {missing}"


def test_public_names_are_documented():
    text = _docs_text()
    missing = [name for name in PUBLIC_NAMES if name not in text]
    assert not missing, f"public names (DESIGN.md §8) never mentioned in docs/: {missing}"
    missing = [name for name in REGISTERED_NAMES if f"`{name}`" not in text]
    assert not missing, f"registered names (DESIGN.md §8) never written as `name` in docs/: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once by ``mkdocs build --strict`` (every warning an error)."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'rlcredit[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}\n{proc.stdout}"
    return out


def _pages(site: Path) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(site.rglob("*.html"))}


def _api_html(site: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((site / "api").rglob("*.html")))


def test_mkdocs_build_strict(site):
    api = _api_html(site)
    missing = [name for name in API_ANCHORS if f'id="{name}"' not in api]
    assert not missing, f"the API reference has no entry for: {missing}"


# --- the built site needs no network -------------------------------------------------------------

# Attributes through which a page makes the browser fetch something by itself (links are not fetched).
_FETCHING = re.compile(
    r"<(script|img|iframe|source|audio|video|embed|track|input)\b[^>]*?\ssrc=[\"']([^\"']+)[\"']"
    r"|<link\b[^>]*?\shref=[\"']([^\"']+)[\"']"
    r"|<object\b[^>]*?\sdata=[\"']([^\"']+)[\"']",
    re.IGNORECASE,
)
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)""", re.IGNORECASE)


def _is_remote(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.netloc) or parts.scheme not in ("", "data")


def test_site_fetches_nothing_from_the_network(site):
    """No CDN, web font or remote stylesheet: the site renders the same with the network cable out."""
    remote = []
    for page, text in _pages(site).items():
        for match in _FETCHING.finditer(text):
            url = next(g for g in match.groups()[1:] if g)
            if _is_remote(html.unescape(url)):
                remote.append(f"{page.relative_to(site)}: {match.group(0)[:120]}")
        for style in re.findall(r"<style\b[^>]*>(.*?)</style>", text, re.S | re.I):
            remote += [f"{page.relative_to(site)}: <style> url({u or i})" for u, i in _CSS_URL.findall(style)
                       if _is_remote(u or i)]
    for css in sorted(site.rglob("*.css")):
        remote += [f"{css.relative_to(site)}: url({u or i})" for u, i in _CSS_URL.findall(css.read_text(encoding="utf-8"))
                   if _is_remote(u or i)]
    assert not remote, "the built site loads resources from other hosts:\n" + "\n".join(remote[:20])


def test_local_assets_exist(site):
    """Every script and stylesheet a page references is a file of the site (the vendored ones included)."""
    missing = []
    for page, text in _pages(site).items():
        for match in _FETCHING.finditer(text):
            url, tag = next(g for g in match.groups()[1:] if g), match.group(0).lower()
            if _is_remote(url) or url.startswith("data:") or (tag.startswith("<link") and "stylesheet" not in tag):
                continue
            path = urlsplit(html.unescape(url)).path
            target = (site / path.lstrip("/") if path.startswith("/") else page.parent / path).resolve()
            if not target.is_file():
                missing.append(f"{page.relative_to(site)} -> {url}")
    assert not missing, "pages reference files the site does not contain:\n" + "\n".join(sorted(set(missing))[:20])


def test_no_mermaid_blocks(site):
    """material typesets `class="mermaid"` blocks with Mermaid fetched from unpkg.com: diagrams are SVG files
    inlined from docs/assets instead (see docs/concepts.md)."""
    pages = [str(p.relative_to(site)) for p, text in _pages(site).items() if re.search(r'class="(?:[^"]*\s)?mermaid(?:\s[^"]*)?"', text)]
    assert not pages, f"Mermaid diagrams need the network (material loads Mermaid from a CDN): {pages}"


def test_diagram_labels_are_readable(site):
    """The Concepts diagram is inline SVG drawn at most 900 units wide with text of at least 13 units, so at
    the text column's width (about 940 px at a 1280 px window) its labels render at 13 px or more."""
    text = (site / "concepts" / "index.html").read_text(encoding="utf-8")
    svgs = [(w, body) for w, body in re.findall(r"<svg\b[^>]*\bviewBox=\"0 0 ([\d.]+) [\d.]+\"[^>]*>(.*?)</svg>",
                                                 text, re.S) if "<text" in body]  # not the theme's icons
    assert svgs, "the Concepts page has no inline SVG diagram"
    for width, body in svgs:
        assert float(width) <= 900, f"diagram drawn {width} units wide: its labels shrink in a ~900 px column"
        sizes = [float(s) for s in re.findall(r"font-size:\s*([\d.]+)px", body)]
        assert sizes and min(sizes) >= 13, f"diagram label sizes {sizes}: keep them >= 13 px"


# MathJax 3's autoload table (in the vendored tex-svg.js): these macros and environments make MathJax
# fetch an extension file, which the site does not ship. The maths must stay within base + AMS.
_AUTOLOADED_MACROS = {
    "toggle", "mathtip", "texttip", "bbox", "boldsymbol", "bra", "ket", "braket", "set", "Bra", "Ket", "Braket",
    "Set", "ketbra", "Ketbra", "cancel", "bcancel", "xcancel", "cancelto", "color", "definecolor", "textcolor",
    "colorbox", "fcolorbox", "enclose", "xtwoheadrightarrow", "xtwoheadleftarrow", "xmapsto", "xlongequal",
    "xtofrom", "Newextarrow", "href", "class", "style", "cssId", "ce", "pu", "unicode", "verb", "require",
}
_AUTOLOADED_ENVIRONMENTS = {"CD", "prooftree"}
_MATHJAX_BUNDLE = DOCS / "javascripts" / "vendor" / "mathjax" / "tex-svg.js"


def test_maths_is_typeset_offline(site):
    """Every page with maths loads the MathJax configuration, then the vendored bundle, from the site itself,
    and its TeX needs no MathJax extension beyond the bundle's."""
    bundle = _MATHJAX_BUNDLE.read_bytes()
    assert b"mathjax" in bundle.lower() and len(bundle) > 500_000, f"{_MATHJAX_BUNDLE} is not the MathJax bundle"
    pages_with_maths, bad = 0, []
    for page, text in _pages(site).items():
        tex = re.findall(r'<(?:span|div) class="arithmatex">(.*?)</(?:span|div)>', text, re.S)
        if not tex:
            continue
        pages_with_maths += 1
        scripts = re.findall(r'<script\b[^>]*\ssrc="([^"]+)"', text)
        config = [i for i, s in enumerate(scripts) if s.endswith("javascripts/mathjax.js")]
        loader = [i for i, s in enumerate(scripts) if s.endswith("vendor/mathjax/tex-svg.js")]
        if not (config and loader and config[0] < loader[0]):
            bad.append(f"{page.relative_to(site)}: scripts {scripts} do not load mathjax.js then tex-svg.js")
            continue
        served = (page.parent / scripts[loader[0]]).resolve()
        if not served.is_file() or served.read_bytes() != bundle:
            bad.append(f"{page.relative_to(site)}: {scripts[loader[0]]} is not the vendored bundle")
        source = html.unescape(" ".join(tex))
        macros = set(re.findall(r"\\([A-Za-z]+)", source)) & _AUTOLOADED_MACROS
        envs = set(re.findall(r"\\begin\{([A-Za-z*]+)\}", source)) & _AUTOLOADED_ENVIRONMENTS
        if macros or envs:
            bad.append(f"{page.relative_to(site)}: TeX needs MathJax extensions the site lacks: {sorted(macros | envs)}")
    assert pages_with_maths >= 10, f"only {pages_with_maths} pages have maths: is arithmatex still configured?"
    assert not bad, "\n".join(bad)


# --- the API reference shows every component's parameters and defaults ----------------------------


def _expected_parameters(obj: object) -> list[tuple[str, str | None]]:
    """``(name, default as the docs show it or None)`` for each parameter a user passes to ``obj``.

    An attrs class without a hand-written ``__init__`` of its own takes its ``init`` fields (as the
    docs' griffe extension, docs/_ext/griffe_attrs.py, renders them), whatever ``__init__`` it inherits.
    """
    import attrs

    own_init = vars(obj).get("__init__") if inspect.isclass(obj) else None
    generated = own_init is None or own_init.__code__.co_filename.startswith("<attrs generated")
    if inspect.isclass(obj) and attrs.has(obj) and generated:
        params = []
        for field in sorted((f for f in attrs.fields(obj) if f.init), key=lambda f: f.kw_only):
            default = field.default
            if default is attrs.NOTHING:
                shown = None
            elif isinstance(default, attrs.Factory):
                shown = f"{default.factory.__name__}()"
            elif attrs.has(type(default)):
                shown = f"{type(default).__name__}()"
            else:
                shown = repr(default)
            params.append((field.alias, shown))
        return params
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [(stars.get(p.kind, "") + p.name, None if p.default is p.empty else repr(p.default))
            for p in inspect.signature(obj).parameters.values()]


def _split_parameters(text: str) -> list[str]:
    """Top-level comma-separated items of a parameter list (brackets and quotes respected)."""
    items, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    return [item for item in items if item]


def _shown_parameters(signature: str) -> list[tuple[str, str | None]]:
    """``(name, default or None)`` from a rendered signature ``Name(a: int, b: str = 'x') -> R``."""
    inner = signature[signature.index("(") + 1: signature.rindex(")")]
    shown = []
    for item in _split_parameters(inner):
        head, _, default = item.partition("=")
        name = re.split(r"[:\s]", head.strip(), maxsplit=1)[0]
        if name not in ("*", "/", "self"):
            shown.append((name, default.strip() or None))
    return shown


def _rendered_signature(api: str, obj: object) -> tuple[str, str | None]:
    """The id of ``obj``'s entry in the API reference and its signature text (None when it has none)."""
    module, qualname = obj.__module__, obj.__qualname__
    # The entry sits under the module that defines the object or a package above it that re-exports it.
    ids = [i for i in re.findall(r'<h\d id="([^"]+)" class="doc doc-heading"', api)
           if i.endswith(f".{qualname}") and f"{module}.".startswith(i[: -len(qualname)])]
    assert ids, f"{module}.{qualname} has no entry in the API reference"
    anchor = max(ids, key=len)
    match = re.search(
        rf'<h\d id="{re.escape(anchor)}" class="doc doc-heading">.*?</h\d>\s*'
        rf'(?:<div class="doc-signature[^"]*">(.*?)</div>)?', api, re.S)
    assert match is not None
    signature = match.group(1)
    return anchor, None if signature is None else " ".join(html.unescape(re.sub(r"<[^>]+>", "", signature)).split())


def _registered_objects() -> list[tuple[str, str, object]]:
    import rlcredit

    return [(kind, name, rlcredit.get(kind, name)) for kind, names in sorted(rlcredit.available().items())
            for name in names]


def test_api_reference_shows_every_component_signature(site):
    """Each registered component's API entry shows its signature with every parameter and its default,
    e.g. ``TopFraction(fraction: float, scope: str = 'sequence', score: str | None = None)``."""
    api = _api_html(site)
    wrong = []
    for kind, name, obj in _registered_objects():
        expected = _expected_parameters(obj)
        anchor, signature = _rendered_signature(api, obj)
        if signature is None:
            if expected:
                wrong.append(f"{kind} {name!r} ({anchor}): no signature; expected {expected}")
            continue
        shown = _shown_parameters(signature)
        if shown != expected:
            wrong.append(f"{kind} {name!r} ({anchor}):\n    shown    {signature}\n    expected {expected}")
    assert not wrong, "API signatures that hide or misstate parameters:\n" + "\n".join(wrong)


def test_top_fraction_entry_shows_scope_default(site):
    """The case that motivated the check: TopFraction's default scope is per sequence, not per batch."""
    _, signature = _rendered_signature(_api_html(site), __import__("rlcredit").get("weighter", "top_fraction"))
    assert signature is not None and "scope: str = 'sequence'" in signature, signature
    _, signature = _rendered_signature(_api_html(site), __import__("rlcredit").get("weighter", "intersect"))
    assert signature == "Intersect(parts: tuple)", signature


def test_shown_parameters_parser():
    assert _shown_parameters("F(a: int, b: str | None = None, c: tuple[int, str] = (1, 'x,y'), *, d=2) -> X") == [
        ("a", None), ("b", "None"), ("c", "(1, 'x,y')"), ("d", "2")]
    assert _shown_parameters("G()") == []
    assert _shown_parameters("H(self, *parts: Any, **kwargs: Any)") == [("*parts", None), ("**kwargs", None)]


# --- numbers and lists in the prose match the code ------------------------------------------------

_PROSE = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
_PRESET_RUN = re.compile(r"`[a-z0-9_]+`(?:(?:,\s*|\s+and\s+|,\s+and\s+|\s+or\s+)`[a-z0-9_]+`)+")


def test_preset_lists_are_complete():
    """A list of five or more preset names (`grpo`, `dapo`, ...) in the docs or README names every preset."""
    import rlcredit

    presets = set(rlcredit.available()["strategy"])
    stale = []
    for path in _PROSE:
        for run in _PRESET_RUN.findall(path.read_text(encoding="utf-8")):
            names = re.findall(r"`([a-z0-9_]+)`", run)
            if len(names) >= 5 and set(names) <= presets and set(names) != presets:
                stale.append(f"{path.relative_to(ROOT)}: {' '.join(run.split())} lacks {sorted(presets - set(names))}")
    assert not stale, "preset lists missing presets:\n" + "\n".join(stale)


_LINE_CLAIM = re.compile(r"(?P<approx>about|around|roughly|~)?\s*(?P<n>\d+)[- ]lines?\b", re.IGNORECASE)


def _line_claims() -> list[tuple[str, int, bool, str, int]]:
    """``(where, claimed, approximate, what, actual)`` for each "N lines" / "~N-line" claim in the prose.

    A claim names a file in its paragraph (`examples/x.py`: its line count), or titles a heading whose
    first code block it describes ("In 20 lines": at most 20 lines). Anything else is unverifiable.
    """
    claims = []
    for path in _PROSE:
        text = path.read_text(encoding="utf-8")
        for match in _LINE_CLAIM.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            start = text.rfind("\n\n", 0, match.start()) + 1
            end = text.find("\n\n", match.end())
            paragraph = text[start: end if end >= 0 else len(text)]
            files = re.findall(r"`((?:examples|scripts|benchmarks|rlcredit|rlcredit_mm)/[\w./-]+\.\w+)`", paragraph)
            line = text[text.rfind("\n", 0, match.start()) + 1: text.find("\n", match.end())]
            if files:
                actual = len((ROOT / files[0]).read_text(encoding="utf-8").splitlines())
                what = files[0]
            elif line.lstrip().startswith("#"):
                block = re.search(r"^```[^\n]*\n(.*?)^```", text[match.end():], re.S | re.M)
                actual = len(block.group(1).splitlines()) if block else -1
                what = f"the code block under '{line.strip()}'"
            else:
                actual, what = -1, paragraph.strip()[:80]
            claims.append((where, int(match.group("n")), bool(match.group("approx")), what, actual))
    return claims


def test_line_count_claims_match_the_files():
    """ "about N lines" is within 10 % (and 5 lines) of the file; "N lines" is exact (at most N for a snippet)."""
    claims = _line_claims()
    assert any(what.startswith("examples/") for _, _, _, what, _ in claims), "no line-count claim found: check the regex"
    wrong = []
    for where, claimed, approx, what, actual in claims:
        if actual < 0:
            wrong.append(f"{where}: '{claimed} lines' names no file (`examples/...`) and heads no code block: {what!r}")
        elif what.startswith("the code block"):
            if actual > claimed:
                wrong.append(f"{where}: {what} has {actual} lines, more than the {claimed} claimed")
        elif abs(actual - claimed) > (max(5, round(0.1 * actual)) if approx else 0):
            wrong.append(f"{where}: says {'about ' if approx else ''}{claimed} lines, {what} has {actual}")
    assert not wrong, "line counts in the prose do not match:\n" + "\n".join(wrong)


_ATTRS_CASES = '''
from __future__ import annotations
import attrs


@attrs.frozen
class Base:
    a: int
    b: str = "x"


@attrs.define(kw_only=True)
class Keywords:
    c: float = 1.0


@attrs.frozen
class Child(Base):
    _private: int = attrs.field(default=3)
    renamed: int = attrs.field(default=4, alias="other")
    hidden: int = attrs.field(default=5, init=False)
    items: list = attrs.field(factory=list)
    table: dict = attrs.Factory(dict)
    flag: bool = attrs.field(default=False, kw_only=True)
    b: str = "y"


@attrs.frozen(init=False)
class Custom:
    parts: tuple

    def __init__(self, *parts):
        self.__attrs_init__(parts)
'''


def test_griffe_attrs_extension_matches_attrs(tmp_path):
    """docs/_ext/griffe_attrs.py gives attrs classes the __init__ attrs generates: base fields first, a
    redefined field moved, private names stripped, aliases, factories, init=False and kw_only."""
    griffe = pytest.importorskip("griffe")
    (tmp_path / "attrs_cases.py").write_text(_ATTRS_CASES, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("attrs_cases", tmp_path / "attrs_cases.py")
    attrs_cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attrs_cases)

    extensions = griffe.load_extensions(str(DOCS / "_ext" / "griffe_attrs.py"))
    module = griffe.load("attrs_cases", search_paths=[str(tmp_path)], extensions=extensions)
    for name in ("Base", "Keywords", "Child"):
        cls = getattr(attrs_cases, name)
        static = [(p.name, p.kind.name.lower(), None if p.default is None else str(p.default))
                  for p in module[name]["__init__"].parameters if p.name != "self"]
        kinds = [(p.name, p.kind.name.lower()) for p in inspect.signature(cls).parameters.values()]
        # Defaults as the docs print them (attrs' own __init__ hides factories behind a NOTHING default).
        expected = [(n, k, d) for (n, k), (_, d) in zip(kinds, _expected_parameters(cls), strict=True)]
        assert static == expected, name
    assert [p.name for p in module["Child"]["__init__"].parameters] == [
        "self", "a", "private", "other", "items", "table", "b", "flag"]  # the redefined `b` moves to its new place
    assert module["Custom"]["__init__"].parameters[1].kind.name == "var_positional"  # its own __init__ is kept
