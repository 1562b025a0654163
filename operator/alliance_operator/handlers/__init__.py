"""Reconcilers, one module per custom resource: read, decide, apply, report status.

They are called by ``alliance_operator.main`` (the only module that knows kopf's decorators)
with the object's body and the operator's ``Context``; they return the status patch.
"""
