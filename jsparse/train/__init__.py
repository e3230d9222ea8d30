"""Training: the sparse-then-dense schedule, optax AdamW, orbax checkpoints, metrics, multi-device, CLI and plots.

    from jsparse.train import from_preset, train
    result = train(from_preset("tiny", {"steps": 300, "out_dir": "runs/demo"}))

Command line: ``jsparse-train --help`` and ``jsparse-plot RUN_DIR ... -o loss.png``.
"""

from jsparse.train.config import FFN_MODES as FFN_MODES
from jsparse.train.config import PRESETS as PRESETS
from jsparse.train.config import CheckpointConfig as CheckpointConfig
from jsparse.train.config import DataConfig as DataConfig
from jsparse.train.config import LogConfig as LogConfig
from jsparse.train.config import MeshConfig as MeshConfig
from jsparse.train.config import OptimizerConfig as OptimizerConfig
from jsparse.train.config import ScheduleConfig as ScheduleConfig
from jsparse.train.config import TrainConfig as TrainConfig
from jsparse.train.config import apply_overrides as apply_overrides
from jsparse.train.config import from_preset as from_preset
from jsparse.train.loop import RunPlan as RunPlan
from jsparse.train.loop import TrainResult as TrainResult
from jsparse.train.loop import plan as plan
from jsparse.train.loop import train as train
from jsparse.train.plot import plot_runs as plot_runs
from jsparse.train.schedule import PhasePlan as PhasePlan
