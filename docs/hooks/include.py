"""MkDocs hook: `--8<-- "path"` on a line of its own includes a repository file (ARCHITECTURE.md,
benchmarks/README.md, examples/train_your_dataset.md) that stays where it is, with its relative links rewritten to
work from the site page (a link to `docs/x.md` becomes `x.md`; a link to another included file goes to its page).

pymdownx.snippets would paste the text as it is, leaving links that were written from the file's own folder."""

import posixpath
import re
from pathlib import Path

INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$', flags=re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _pages_of_included_files(files) -> dict[str, str]:
    """repository path of an included file -> the docs page that includes it."""
    pages = {}
    for file in files.documentation_pages():
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for included in INCLUDE.findall(text):
            pages[posixpath.normpath(included)] = file.src_uri
    return pages


def _rewrite_links(text: str, source: str, page: str, pages: dict[str, str], docs_dir: str) -> str:
    def rewrite(match):
        target, anchor = match.group(1), match.group(2) or ""
        if SCHEME.match(target) or target.startswith("/"):
            return match.group(0)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
        if path in pages:
            path = pages[path]
        elif path.startswith(docs_dir + "/"):
            path = path[len(docs_dir) + 1 :]
        else:
            return match.group(0)  # left for mkdocs to report
        return f"]({posixpath.relpath(path, posixpath.dirname(page) or '.')}{anchor})"

    return LINK.sub(rewrite, text)


def _demote_headings(text: str) -> str:
    """One level deeper for every Markdown heading outside code fences (the page already has its title)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,5} ", line):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown, page, config, files):
    root = Path(config["config_file_path"]).parent
    docs_dir = Path(config["docs_dir"]).relative_to(root).as_posix()
    markdown = render_settings_tables(markdown)
    if not INCLUDE.search(markdown):
        return markdown
    pages = _pages_of_included_files(files)

    def include(match):
        source = posixpath.normpath(match.group(1))
        text = (root / source).read_text(encoding="utf-8")
        if re.search(r"^# ", markdown[: match.start()], flags=re.MULTILINE):
            text = _demote_headings(text)
        return _rewrite_links(text, source, page.file.src_uri, pages, docs_dir)

    return INCLUDE.sub(include, markdown)


SETTINGS = re.compile(r"^<!-- settings: ([\w.]+) -->\s*$", flags=re.MULTILINE)


def _type_name(kind) -> str:
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", None) or str(kind)
    return str(name).replace("typing.", "").replace("NoneType", "None")


def settings_table(dotted: str) -> str:
    """The fields of a settings dataclass as HfArgumentParser sees them (inherited ones included): option, type,
    default, help. Rendered from the live class, so the table cannot drift from the code."""
    import dataclasses
    import importlib

    module, name = dotted.rsplit(".", 1)
    arguments = getattr(importlib.import_module(module), name)
    rows = ["| option | type | default | help |", "|---|---|---|---|"]
    for field in dataclasses.fields(arguments):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        help_text = str(field.metadata.get("help", "")).replace("|", "\\|").replace("\n", " ").replace("[", "\\[")
        kind = _type_name(field.type).replace("|", "\\|")
        rows.append(f"| `--{field.name}` | `{kind}` | `{default}` | {help_text} |".replace("`''`", "`''` "))
    return "\n".join(rows)


def render_settings_tables(markdown: str) -> str:
    return SETTINGS.sub(lambda match: settings_table(match.group(1)), markdown)
