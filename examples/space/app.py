"""Run the EmoVLM-KD Space app locally.

    python examples/space/app.py                  # a tiny random model built offline (to try the app)
    python examples/space/app.py MODEL            # a model folder or Hub repo id; or set EMOVLM_KD_MODEL
    python examples/space/app.py MODEL --host 0.0.0.0 --port 7860

This launches `emovlm_kd/repo_template/space/app.py`, the same file export copies into every model repo.
"""

import runpy
from pathlib import Path

SPACE_APP = Path(__file__).resolve().parents[2] / "emovlm_kd" / "repo_template" / "space" / "app.py"

if __name__ == "__main__":
    runpy.run_path(str(SPACE_APP), run_name="__main__")
