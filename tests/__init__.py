"""White-box tests of the package's modules (src/datastore), one file per
concern, and tests/support.py, the helpers they share with test_datastore.py.

They import the package's private names directly, so they run in the package
form only (conftest.py leaves this folder out when DATASTORE_FORM=file).
"""
