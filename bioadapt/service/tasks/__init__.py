"""Every long operation of the service is a task of one kind, in one module each: ``score``, ``fine_tune``,
``evaluate``, ``predict``, ``export``. A task module owns

- its request: the plain data a model actor needs (image references, windows, store paths, parameters);
- its worker body: ``body(adapter, request..., *, stop, progress)``, run on a model actor
  (``execution.ModelActor.run``) with the model already loaded;
- its driver: ``submit(context, caller, args, progress)`` checks the call and starts a job whose work leases
  actors from the service's model pool, runs the body, and commits what it returns. ``context``
  (``service/context.py``) is everything a task uses of the service; tasks import neither ``api`` nor each other.

A task is registered in ``schemas.FUNCTIONS`` (its name, its arguments' model, its module here): the service, its
Hypha face and the client make their functions from that registry.

Every job runs through the same runner (``service/jobs.py``): one record, one set of states (queued, running,
done, failed, cancelled), progress, cancel and retry, so the client's ``wait`` works for all of them.
"""
