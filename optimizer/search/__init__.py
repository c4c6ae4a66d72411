"""The study: config → search space → Optuna trials, run on a storage until a target.

What lives where: :mod:`~optimizer.search.run` runs a study to its target (the one loop ``search``
and ``worker`` share), :mod:`~optimizer.search.study` opens, creates and joins studies,
:mod:`~optimizer.search.space` turns the config into parameters and a trial into a plan,
:mod:`~optimizer.search.storage` opens storages by URL, :mod:`~optimizer.search.attrs` names what
a study stores, and :mod:`~optimizer.search._optuna` fences every use of Optuna's internals.
"""
