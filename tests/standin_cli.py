"""`autorefine.cli` with the process-score stand-in installed (subprocess tests until the real module lands)."""

import sys

from tests.process_score_standin import install

install()

from autorefine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
