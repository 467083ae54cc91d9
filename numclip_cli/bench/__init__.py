"""``numclip bench`` core, one module per concern.

``speed`` times predict against raw open_clip; ``accuracy`` trains and tests every method on the synthetic suites;
``system`` describes the machine and measures processes (memory, a timed subprocess); ``report`` assembles the
``--json`` report, judges figures against the targets that apply to the model, and renders markdown tables.
"""
