"""People label the images worth it, and their labels come back as class folders.

select.py, strategies.py   `detect-waste-cls select`: rank the unlabeled images -> selection.csv
label_studio.py            export: selection CSVs -> a Label Studio project folder (config, tasks with the
                           model's guess pre-filled, README); the images are served from the dataset folder
label_studio_import.py     import: Label Studio's JSON export -> images copied or moved into train/<class>/,
                           with a manifest; never overwrites, and a second run changes nothing
label_studio_api.py        push (create the project through the REST API) and pull (download the JSON export)
label_studio_server.py     a real Label Studio on localhost, in its own venv: for the tests and the docs

None of these import Label Studio: it runs in its own virtualenv (scripts/label_studio_venv.sh), and
the commands talk to it over HTTP or through files.
"""

# Names the commands share, here where nothing is imported: the CLI's parser needs no numpy, and the label-studio
# commands read and write selections without importing torch.
# What `select --strategy` offers, each implemented in strategies.py as <name>_picks.
STRATEGY_NAMES = ("random", "margin", "entropy", "coreset", "typiclust", "cluster-margin")
# A selection, as `select` writes it and `label-studio export` reads it.
SELECTION_CSV = "selection.csv"
COLUMNS = ("path", "predicted", "confidence", "score", "rank", "source")
# source: what a person is asked about the image
PICKED = "select"  # an unlabeled image to label
PSEUDO_REVIEW = "pseudo-review"  # an unlabeled image whose confident pseudo-label to accept or fix
LABEL_ISSUE = "label-issue"  # a training image whose folder label cleanlab doubts
