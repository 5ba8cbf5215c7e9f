"""Print the README's two opening commands, one per line, as a newcomer would copy them (comments dropped).

.ci/run runs each with bash in a fresh environment holding the newest versions the project allows, so the
README's promise (install + demo, then the tests) is checked as written, not as CI would rather run it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def opening_commands(text: str) -> list[str]:
    """The commands of the README's first ```bash block: its non-empty lines without trailing comments."""
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise ValueError("README.md has no ```bash block")
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{command}\n" for command in opening_commands(README.read_text())))
