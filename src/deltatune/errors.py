"""The errors deltatune raises. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class DeltaTuneError(ValueError):
    """Base class of every error deltatune raises on bad input."""


class TargetNotFoundError(DeltaTuneError):
    """A `target_modules` / `modules_to_save` / `exclude_modules` entry matched no module."""


class TargetConflictError(TargetNotFoundError):
    """The config's fields contradict each other about which modules are targets (every target is
    also in `modules_to_save`, so nothing is left for the method)."""


class PlacementError(DeltaTuneError):
    """A method put two adapters of one name at one module."""


class UnsupportedModuleError(DeltaTuneError):
    """A selected module has a type the method cannot adapt."""


class UnknownMethodError(DeltaTuneError):
    """A method name that is not registered."""


class MethodNameError(DeltaTuneError):
    """A method registered under a name that is not valid, or that another method has taken."""


class AdapterNameError(DeltaTuneError):
    """An adapter name that is already taken, or not present."""


class AdapterShapeError(DeltaTuneError):
    """Weights on disk do not fit the model they are loaded into."""


class AdapterFileError(DeltaTuneError):
    """An adapter folder or weights file that is missing, truncated or corrupted."""


class MergeError(DeltaTuneError):
    """A merge that would give wrong weights (non-finite values, tied parameters)."""


class OutputFolderError(DeltaTuneError):
    """An output folder that cannot be written, or whose writing would destroy an input or earlier work."""


class TrainingDivergedError(DeltaTuneError):
    """A training step gave a non-finite loss, gradient norm or weight; nothing broken was saved."""


class FinalEvaluationError(DeltaTuneError):
    """The evaluation after a run's last step failed; the trained adapter was saved before it."""


class CheckpointMismatchError(DeltaTuneError):
    """A checkpoint written by a run with other settings (or other data) than the run resuming it."""


class BaseWeightsError(AdapterShapeError):
    """An adapter loaded with `strict=True` onto a base whose weights are not those it was trained on."""


class BaseWeightsWarning(UserWarning):
    """An adapter was loaded onto a base whose weights are not those it was trained on (`strict=True` refuses)."""


class RandomWeightsWarning(UserWarning):
    """Weights of a loaded model start at random where a file should have given them: the checkpoint lacks
    weights outside the task head it adds, or an adapter loaded next holds no weights for that new head."""


class MaxLengthCutWarning(UserWarning):
    """Records longer than max_length were cut: what was cut is neither trained on nor evaluated. One
    notice a data set and kind, naming the first record and the max_length that keeps them whole."""


class CutCompletionsWarning(MaxLengthCutWarning):
    """Records whose language-model completions max_length cut: their ends are not trained on (nor in the eval loss)."""


class CutInputsWarning(MaxLengthCutWarning):
    """Records whose input text (a classification text or pair, a seq2seq source, an embedding text)
    max_length cut: the model never sees its end."""


class CutWordsWarning(MaxLengthCutWarning):
    """Token-classification records whose words past max_length were cut: those words get no tag, in
    training or scoring."""


class UnsupportedFormatError(DeltaTuneError):
    """An adapter that the file format asked for (peft's, AdapterHub's) cannot express: another library
    would load its folder as another model."""
