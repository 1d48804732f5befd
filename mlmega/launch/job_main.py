"""What srun starts on every task of a stage's job: signal handlers first, then submitit's job.

submitit's own entry point (``python -m submitit.core._submit FOLDER``) installs its handlers only
after unpickling the job, which imports mlmega, megatron-core and torch (seconds to tens of
seconds): a USR2 meanwhile (a short time limit, ``scancel --signal``) killed the task (exit 12).
Here :func:`mlmega.train.signals.catch_early` records it before anything is imported; training
then saves after its first step and the job requeues itself.
"""

from mlmega.train import signals


def main() -> None:
    signals.catch_early()
    from mlmega import compat
    from mlmega.models import lazy_compile

    lazy_compile.install()  # before the job's unpickling imports megatron-core

    compat.submitit_main()


if __name__ == "__main__":
    main()
