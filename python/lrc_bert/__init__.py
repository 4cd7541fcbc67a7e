"""lrc_bert: the LRC-BERT distillation trainer (Fu et al., AAAI 2021) on top of lrc_kernels.

    lrc-bert finetune --task sst2 --model bert-base-uncased --output runs/teacher
    lrc-bert distill  --task sst2 --teacher runs/teacher/model --output runs/student
    lrc-bert evaluate --task sst2 --model runs/student/student

The pieces: ``tasks`` (GLUE / SNLI data and label maps), ``metrics``, ``config``
(validated settings, YAML + flags), ``losses`` (registered by name), ``distill`` and
``finetune`` (the two training methods), ``trainer`` (the loop, evaluation, logging),
``checkpoint`` (atomic, resumable) and ``cli``.
"""

__version__ = "0.1.0"
