"""One training loop for every module, in one process or under ``torchrun``.

- :mod:`.loop`: :func:`train_module` (set-up and resume, epochs, steps, early stopping, non-finite guards);
- :mod:`.checkpoint`: atomic checkpoints; :mod:`.optim`: Adam groups and the gradient check;
- :mod:`.schedule`: learning-rate schedules; :mod:`.evaluate`: ELBO, IWAE log p(x) and reconstruction error;
- :mod:`.distributed`: torch.distributed helpers and device choice; :mod:`.threads`: thread counts.
"""

from ..errors import CellvaeTrainingError
from ..settings import TrainingPlan, default_max_epochs
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .evaluate import evaluate_elbo
from .loop import kl_weight_at, train_module
from .optim import make_optimizer
from .schedule import COSINE_FLOOR, LR_SCHEDULES, lr_at
from .threads import default_n_threads, torch_threads

__all__ = ["TrainingPlan", "train_module", "default_max_epochs", "evaluate_elbo", "kl_weight_at", "torch_threads",
           "default_n_threads", "CellvaeTrainingError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME",
           "make_optimizer", "lr_at", "LR_SCHEDULES", "COSINE_FLOOR"]
