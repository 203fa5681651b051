"""``python -m aotcache.cli``: the same as the ``aotcache`` command."""

from aotcache.cli import main

if __name__ == "__main__":
    main()
