"""Write the shipped tiny base in the 2023 hub layouts (repro/era_layouts.py says what each holds).

    python scripts/make_2023_layouts.py OUT_DIR

writes OUT_DIR/<weights>/ for each of era_layouts.WEIGHTS (about 0.6 MB each). The tests build the
same directories in tmp_path, so nothing generated is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qformer_lora.repro import era_layouts  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for weights in era_layouts.WEIGHTS:
        print(era_layouts.write(Path(sys.argv[1]) / weights, weights))
