"""Teachers: where their logits come from, how they are cached, and the bank the trainer reads them from.

* ``bank.py`` -- :class:`~metagate.teachers.bank.TeacherBank` and the bank protocol, ``HostBank``;
* ``sequence.py`` -- the per-token bank, token tables, the top-k form;
* ``online.py`` -- ``OnlineBank``: teachers run on each step's inputs;
* ``sparse.py`` -- ``SparseBank``: language models' top-k teachers per token on disk (safetensors), never ``[N, V]``;
* ``files.py`` -- teacher-logits files;
* ``sources.py`` -- what may stand for a teacher (``TeacherLike``, :func:`~metagate.teachers.sources.online`);
* ``training.py`` -- teachers trained by the project;
* ``cache.py`` -- the cache's layout, its one loader and its writer rule;
* ``calibration_cache.py`` -- the teachers' temperature fit and reliability table, cached with the bank (and the
  small-JSON cache it is kept by, ``cached_json``);
* ``pretrained.py`` -- a task's pretrained teachers' select / test accuracy, measured once and cached with the bank;
* ``build.py`` -- the one bank builder (:func:`~metagate.teachers.build.build_bank`, ``load_teachers``).

Imports name the file that holds a thing (``from metagate.teachers.bank import TeacherBank``). This module imports
nothing: the modules below the trainer (bank, sequence, online, sparse, files, sources, cache, calibration_cache,
pretrained) load without the ones above it (training, build), which import the trainer.
"""
