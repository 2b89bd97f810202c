"""Built-in demos behind ``distill demo``: ``digits`` (classifier distillation), ``lm`` (the invoice task)
and ``triage`` (support tickets with sampled labels: soft labels against the teacher's text).

Owns: the demos (`digits.py`, `lm.py`, `triage.py` with `triage_eval.py` and `triage_report.py`), their
generated tasks (`tasks.py`, `triage_task.py`) and what the LM demos share (`common.py`).
May import: everything above (it sits below the command line only).
"""
