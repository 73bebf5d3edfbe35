"""Training: the one loop both trainers share (:mod:`.loop`) and the two stage tasks that plug into it."""
