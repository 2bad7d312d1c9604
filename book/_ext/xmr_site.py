"""Site fixes for the book (a local Sphinx extension, registered in ``_config.yml``).

sphinx-thebe and sphinx-togglebutton register their inline configuration scripts once per reading pass, and
the build runs that hook twice (once with filename None, once with ""), so every page carried each script twice; the second
``const THEBE_JS_URL`` is a JavaScript SyntaxError in the browser console. Each page keeps the first copy.
"""


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", drop_duplicate_scripts, priority=999)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}

