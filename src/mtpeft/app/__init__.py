"""mtpeft's application, built on the library (``mtpeft.lib``, which never imports it): tasks and data
(``data``, ``assets``), base models (``base_models``), run configs and folders, the HF Trainer subclass
(``trainer``), the train / eval pipeline (``pipeline``), evaluation, reports and routing reports, studies,
exports of run folders (``export_run``, ``distill_run``), the benchmark harness (``bench``) and the CLI
(``cli``). Importing it loads nothing: ``mtpeft --help`` answers before torch is imported.
"""
