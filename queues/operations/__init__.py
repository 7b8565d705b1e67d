"""Operations on many tasks at once: requeue, reprioritise, cancel and clean up, run as recorded bulk operations
(``services``) with their admin pages and actions (``admin``)."""
