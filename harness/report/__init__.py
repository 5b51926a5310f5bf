"""The report: a study's frames and verdicts -> figures, tables and reports/NAME.pdf (+ Markdown, CSVs).

    build.py    python -m harness.report: loads the study, evaluates the plan, writes every output
    setup.py    the setup table: the paper, the study's paper scale and this run side by side
    figures.py  the seaborn figures
    pdf.py      pages that fill before a new section starts
    finder.py   the LR finder's figure (python -m harness.report.finder), also inside its study's report
    best_lr.py  an LR grid per level of a field: each level's best LR, the 1/c test, the seed's-settings table
    shape.py    a reduced scale's curves beside the authors' logs, each on its run's own clock
"""
