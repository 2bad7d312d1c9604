"""Site fixes for the book (a local Sphinx extension, registered in ``_config.yml``).

Every page carried sphinx-thebe's and sphinx-togglebutton's inline configuration scripts twice (registered once
with filename None and once with "", so Sphinx's own de-duplication missed them); the second
``const THEBE_JS_URL`` is a JavaScript SyntaxError in the browser console. Each page keeps the first copy.

``static/xmr.css`` wraps long code lines in the notebooks' cells instead of letting them overflow the column.
"""

from pathlib import Path

STATIC = Path(__file__).with_name("static")


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def add_static_path(app, config):
    config.html_static_path.append(str(STATIC))


def setup(app):
    app.connect("config-inited", add_static_path)
    app.add_css_file("xmr.css")
    app.connect("html-page-context", drop_duplicate_scripts, priority=999)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}

