r"""The paper's ablations (Tables 3–6 and more), reproducible: train, evaluate, tabulate, plot.

    python -m rma_jax.experiments --config=configs/demo.py --table=all --seeds=3 \
        --workdir=runs/ablations_demo --results_dir=docs/ablations --page=docs/ablations.md
    python -m rma_jax.experiments --config=configs/demo.py --table=all --seeds=3 \
        --results_dir=docs/ablations --page=docs/ablations.md --write_only

For each seed ``s`` the stage-1 baseline (the first step of the paper's two-step recipe) is
trained in ``WORKDIR/seed<s>/stage1`` and evaluated; every stage-2 run of that seed starts
from it (``init.from_checkpoint``) and lives in ``WORKDIR/seed<s>/<run>``; the equal-budget
baselines start from stage 1's initialisation instead (runs and their kinds are in
``configs/ablations.py``). A run is trained, then evaluated once under every protocol
(single view and ten views, at both scales, fused); each table row reads its protocol.

**Results to commit.** Every finished run writes one compact JSON,
``RESULTS_DIR/seed<s>/<run>.json`` (``stage1.json`` for stage 1): the metrics of every
protocol, the pointing game and its chance control, attention recall, the wall and CPU
time of training and of evaluation, the load average at start and end, the git commit and
the full run config (``run_record``). It is written atomically (a temporary file renamed
over it), and only when the run is finished, so a file that exists is final.

**Resuming.** A run whose JSON exists is skipped. An interrupted run resumes from its last
checkpoint in WORKDIR; a run whose training had finished is only evaluated again (its
training time was saved in ``WORKDIR/seed<s>/<run>/train_timing.json``). A run resumed in
the middle of training records ``resumed_from_step`` and ``timing.comparable = false``: its
wall time covers the last session only.

**Wall times** are measured with one training at a time (this runner never runs two at
once); the load average at the start and end of each run says whether anything else shared
the machine.

**Tables** are built only from the JSONs in RESULTS_DIR (``write_tables``), after each seed
and with ``--write_only``: ``RESULTS_DIR/table_<t>.md`` (the paper's layout, mean ± sample
std over seeds, the per-seed values, the paper's published numbers beside where the data
set is VOC 2007 / MS-COCO 2014), ``table_<t>.json`` (the same numbers, fractions, and each
row's run and protocol), ``table_<t>.png``, ``pointing.png`` / ``attention_recall.png`` and
``summary.md``. A table with fewer finished seeds than asked for is marked partial (with
the seeds it has). ``--page=docs/ablations.md`` rewrites the generated section of that page
(between ``GENERATED_BEGIN`` and ``GENERATED_END``) from the same files, and
``check_page`` (``--check``) verifies that every number in the page's tables is one of the
committed JSON numbers and that every table JSON follows from the per-run JSONs.

Any config field can be overridden as for ``rma_jax.main``: ``--config.optim.num_epochs=6``.
Nothing here imports TensorFlow (the input pipeline does, lazily, when a run starts).

The modules: ``records`` (one run's JSON record), ``runner`` (training and evaluating the
runs, resuming), ``tables`` (the tables, figures and page from the records), ``check``
(``--check``) and ``__main__`` (the command line).
"""
