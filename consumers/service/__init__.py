"""The service's composition: `billing up` from start to stop, the wiring of its loops, and
the predictive auto-stop scheduler."""
