"""The mail templates: the packaged ones (``conf/mail/*.txt``, package data), each
replaced by the file of the same name in ``[mail] templates`` when the
operator has one there. ``NAME.html`` next to ``NAME.txt`` adds an HTML
alternative."""

from __future__ import annotations

from pathlib import Path

from policy.mail import MailEvent, Template, TemplateError
from proxy.data import DATA


def load_templates(folder: Path | None) -> dict[str, Template]:
    """Every event's template, or TemplateError naming the file at fault."""
    found: dict[str, Template] = {}
    packaged = DATA.joinpath("mail")
    for event in MailEvent:
        name = f"{event.value}.txt"
        own = folder / name if folder is not None else None
        try:
            if own is not None and own.is_file():
                text = own.read_text(encoding="utf-8")
                label = str(own)
            else:
                text = packaged.joinpath(name).read_text(encoding="utf-8")
                label = name
            html_file = own.with_suffix(".html") if own is not None else None
            html = (html_file.read_text(encoding="utf-8")
                    if html_file is not None and html_file.is_file() else None)
        except (OSError, UnicodeError) as e:
            raise TemplateError(f"{name}: cannot read it: {e}") from None
        found[event.value] = Template.parse(label, text, html)
    return found
