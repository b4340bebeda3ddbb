"""The review loop: a web app over an output folder (look, accept or reject, correct) and the
export of the reviewed cases as training data. Reads outputs and writes beside them; never
imported by pipeline/ or batch/."""
