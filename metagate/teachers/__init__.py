"""Teachers: where their logits come from, how they are cached, and the bank the trainer reads them from.

Imports name the file that holds a thing (``from metagate.teachers.bank import TeacherBank``); this package
module imports nothing, so the bank modules below the trainer load without the ones above it.
"""
