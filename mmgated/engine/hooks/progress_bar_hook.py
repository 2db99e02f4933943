from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.utils import ProgressBar


@HOOKS.register_module()
class TrainProgressBarHook(Hook):
    """Draw a progress bar over all training iterations on the terminal.

    Meant for short interactive runs such as the demo, next to (or instead
    of) the logger's periodic lines.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self.bar = None

    def before_train(self, runner) -> None:
        if is_main_process():
            remaining = runner.max_iters - runner.iter
            self.bar = ProgressBar(remaining, bar_width=40)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if self.bar is not None:
            self.bar.update()

    def after_train(self, runner) -> None:
        if self.bar is not None:
            self.bar.file.write('\n')
            self.bar = None
