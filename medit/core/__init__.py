"""medit core: hookspecs, plugin manager, requests, hparams, model handle, edits, scoring, evaluation."""
