"""`qadapter train ARGS...` with every training step delayed by $QADAPTER_TEST_STEP_SLEEP seconds
(the computation is unchanged), so that a test can SIGKILL it right after a chosen checkpoint."""

import os
import sys
import time

from qadapter import cli
from qadapter.trainer import QAdapterTrainer

delay = float(os.environ.get("QADAPTER_TEST_STEP_SLEEP", "0"))
step = QAdapterTrainer.training_step


def slow_step(self, *args, **kwargs):
    time.sleep(delay)
    return step(self, *args, **kwargs)


QAdapterTrainer.training_step = slow_step
sys.exit(cli.main(["train", *sys.argv[1:]]))
