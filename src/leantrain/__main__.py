"""``python -m leantrain ...``: the ``leantrain`` command. Under ``torchrun`` the ranks other than 0 of a federated or
hetero run follow rank 0 without opening a run folder (:func:`leantrain.runs.follower.follower_main`)."""

import os
import sys


def _follower_rank() -> bool:
    try:
        return int(os.environ.get("RANK") or 0) > 0 and int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def _main() -> None:
    if _follower_rank():
        from leantrain.runs.follower import follower_main

        sys.exit(follower_main(sys.argv[1:]))
    from leantrain.cli import main

    main()


if __name__ == "__main__":
    _main()
