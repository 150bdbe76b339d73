"""The names of lmms-vg's metrics in lmms-eval's results files, defined once: the task YAMLs list them (tested), the tasks'
``process_results`` fill them, the report reads them as ``<metric>,<filter>``."""

FILTER = "none"  # lmms-vg's tasks apply no lmms-eval filter

ACCURACY, BREAKDOWN, SAMPLES = "accuracy", "breakdown", "samples"
BLEU1, OPEN_RECALL, BERTSCORE = "bleu1", "open_recall", "bertscore"
BEST_LAYER, HEAD_KL = "best_layer", "head_kl"
LAYER_METRICS = ("ar", "kl", "js")  # per-layer means the report draws (iou too is written)

CLOSED_METRICS = (ACCURACY, BREAKDOWN, SAMPLES)
OPEN_METRICS = (BLEU1, OPEN_RECALL, BERTSCORE, SAMPLES)
GROUNDING_METRICS = (*(f"{m}_by_layer" for m in (*LAYER_METRICS, "iou")), BEST_LAYER, SAMPLES, HEAD_KL)


def key(metric: str) -> str:
    """The metric's entry in a results file's ``results[task]``."""
    return f"{metric},{FILTER}"


def by_layer(metric: str) -> str:
    return key(f"{metric}_by_layer")
