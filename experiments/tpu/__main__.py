"""`python -m experiments.tpu ...` is `python -m experiments.tpu.pod ...`."""
import sys

from experiments.tpu.pod import main

sys.exit(main())
