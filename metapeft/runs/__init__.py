"""Fine-tuning runs of the ``metapeft`` command line: the run config (:mod:`metapeft.runs.config`), what it builds
(:mod:`metapeft.runs.builders`), a run directory's lock (:mod:`metapeft.runs.lock`) and its life from preparation to
a rebuilt model (:mod:`metapeft.runs.directory`). Import the submodules; this package imports nothing, so the
foundation-layer lock does not pull in the trainer."""
