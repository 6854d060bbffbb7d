"""Lightning pieces: the edit loop, the callback that runs editors in it, and the training of
trainable editors (``editor_train``)."""
