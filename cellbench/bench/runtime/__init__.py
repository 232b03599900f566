"""The run-time: the engine and its collaborators (walker, policy, run state, conditions track, supervisor), the
event stream, the store, the clock. It knows the roles, never a driver."""
