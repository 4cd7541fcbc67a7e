"""lrc_bert: the LRC-BERT distillation trainer (Fu et al., AAAI 2021) on top of lrc_kernels.

    lrc-bert finetune --task sst2 --model bert-base-uncased --output runs/teacher
    lrc-bert distill  --task sst2 --teacher runs/teacher/model --output runs/student
    lrc-bert evaluate --task sst2 --model runs/student/student

For other trainers: ``LRCDistillationLoss`` (the whole LRC loss as an ``nn.Module`` that owns
the projections) and ``EmbeddingPerturbation`` (gradient perturbation); see ``lrc_loss.py``
and ``examples/hf_trainer.py``.

The pieces: ``tasks`` (GLUE / SNLI data and label maps), ``data``, ``metrics``, ``config``
(validated settings, YAML + flags), ``losses`` (registered by name, with their settings),
``negatives``, ``modeling`` (student, projections, export), ``lrc_loss``, ``method`` (what the
trainer expects of a method), ``distill`` and ``finetune`` (the two methods), ``trainer`` (the
loop, evaluation, logging, divergence guard), ``checkpoint`` (atomic, verified, resumable),
``runtime`` (devices, precision, torchrun), ``runs`` (the command entry points) and ``cli``.
"""

__version__ = "0.1.0"

__all__ = ["LRCDistillationLoss", "EmbeddingPerturbation", "LRCLossOutput", "__version__"]


def __getattr__(name):
    # Lazy: `import lrc_bert` (and `lrc-bert --help`) stays free of torch until these are used.
    if name in ("LRCDistillationLoss", "EmbeddingPerturbation", "LRCLossOutput"):
        from . import lrc_loss

        return getattr(lrc_loss, name)
    raise AttributeError(f"module 'lrc_bert' has no attribute {name!r}")
