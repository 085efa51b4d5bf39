"""The protocol's vocabulary: the message kinds the roles exchange (the only kinds a node
accepts) and which role may send each.


* ``model``    PS -> worker: the PS's model for step t, i.e. a gradient request.
* ``grad``     worker -> PS: gradient for step t (+ BatchNorm buffers when the model has any);
               ``meta = {"loss": float}``.
* ``ps_model`` PS -> PS: the PS's updated model for step t (the gather phase).
* ``done``     PS -> worker and PS -> PS: the PS has finished its last step (no tensors).
* ``pull``     worker -> PS (paper --sync): send me your model of step >= t (no tensors).
* ``ps_after`` PS -> PS (paper mode): the PS's model after a gather, to measure the diameter.
* ``ps_ask``   PS -> PS: send me (again) your ``ps_model`` of step >= t (no tensors): the
               re-ask of a gather that waits for a model that was lost.
* ``leak``     PS -> worker, only under the TEST HARNESS ``--scheduled_byzantine`` (the
               network adversary, :mod:`byzsgd.roles.adversary_schedule`): a correct worker's
               gradient of step t that the PS holds back, copied to the listed Byzantine
               workers; ``meta = {"worker": its sender's rank}``.  Only those workers register it.

Each kind is accepted only from the role that may send it (``SENDERS``, enforced by the node
before any handler runs; refusals are counted in ``node.stats.refused["sender:<kind>"]``).

In paper mode the same kinds are used: a worker takes the first q_ps ``model`` messages of
step t, aggregates them with the coordinate-wise median and sends one ``grad`` to every PS.
"""
from __future__ import annotations

KIND_MODEL = "model"
KIND_GRAD = "grad"
KIND_PS_MODEL = "ps_model"
KIND_DONE = "done"
KIND_PULL = "pull"  # paper --sync: a worker asks one PS for its model of a step (no tensors)
KIND_PS_AFTER = "ps_after"  # paper mode: a PS's model after a gather (for the diameter)
KIND_PS_ASK = "ps_ask"  # a PS asks a peer for its ps_model of step >= t (no tensors)
KIND_LEAK = "leak"  # test harness (--scheduled_byzantine): a held correct gradient, to the Byzantine workers

#: who may send each kind: the one place the roles' handlers take it from (Role.accept)
SENDERS = {KIND_MODEL: "ps", KIND_GRAD: "worker", KIND_PS_MODEL: "ps", KIND_DONE: "ps",
           KIND_PULL: "worker", KIND_PS_AFTER: "ps", KIND_PS_ASK: "ps", KIND_LEAK: "ps"}

#: whom each role exchanges messages with (the SENDERS above, both ways): a worker talks to
#: PSes only, so workers never connect to one another
PEER_ROLES = {"ps": ("ps", "worker"), "worker": ("ps",)}
