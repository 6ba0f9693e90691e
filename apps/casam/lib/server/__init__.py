"""The app's server side: hooks on MONAI Label's endpoints, request checks, guarded datastore and sessions, training."""
