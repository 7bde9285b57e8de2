"""``python -m flashcomm.tools.settings_doc``: the configuration tables of README.md and
DEVELOPERS.md, generated from :data:`flashcomm.settings.SETTINGS`.

``--markdown SCOPE`` prints one scope's table; ``--write FILE`` rewrites every generated
block of FILE (between ``<!-- settings:SCOPE -->`` and ``<!-- /settings:SCOPE -->``);
``--check FILE`` exits 1 when one is not current (tests/test_settings.py checks both
files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from flashcomm.settings import SCOPES, markdown, render


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print a table, or rewrite / check the generated
    tables of a Markdown file."""
    p = argparse.ArgumentParser(prog="python -m flashcomm.tools.settings_doc",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", choices=SCOPES, help="print the table of one scope")
    p.add_argument("--write", type=Path, action="append", default=[],
                   help="rewrite the generated tables of this Markdown file")
    p.add_argument("--check", type=Path, action="append", default=[],
                   help="exit 1 when a generated table of this file is not current")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown(args.markdown))
    for path in args.write:
        path.write_text(render(path.read_text()))
    stale = [str(path) for path in args.check if render(path.read_text()) != path.read_text()]
    if stale:
        print(f"not current (run python -m flashcomm.tools.settings_doc --write FILE): "
              f"{', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
