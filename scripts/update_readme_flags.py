"""Rewrite the README's flag table from the setting declarations (dreamlora.config): `python scripts/update_readme_flags.py`.

tests/test_cli.py::test_the_readme_flag_table_is_the_declarations fails when the README and the declarations differ.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dreamlora, not an installed one

from dreamlora.config import flag_table  # noqa: E402

START, END = "<!-- flags: start (scripts/update_readme_flags.py) -->", "<!-- flags: end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{flag_table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
