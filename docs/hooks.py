"""mkdocs hook: the docstrings use Sphinx roles (``:class:`cellvae.CountVAE```), which mkdocstrings renders as the
role's name followed by the code; drop the role's name so that only the code is shown."""

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
