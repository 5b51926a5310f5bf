"""The report: a study's frames and verdicts -> figures, tables and reports/NAME.pdf (+ Markdown, CSVs).

    build.py    python -m harness.report: loads the study, evaluates the plan, writes every output
    setup.py    the setup table: the paper, the study's paper scale and this run side by side
    figures.py  the seaborn figures
    pdf.py      pages that fill before a new section starts
    finder.py   the LR finder's figure (python -m harness.report.finder)
"""
