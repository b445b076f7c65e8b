"""Plain-PyTorch architectures of published networks whose weights cloak loads strictly.

Each module rebuilds one upstream network with the same ``state_dict`` key names and shapes, so the
published checkpoint loads with ``load_state_dict(strict=True)``, and offers a ``build_*`` function that
makes the same class at any (e.g. tiny, random-weight) size for tests. Licence facts are at the top of
each module. No weights ship with cloak.
"""
