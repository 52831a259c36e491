"""What every package of refiner uses: the user-error type (`errors`) and the device choice (`devices`).

It imports nothing from the other packages, so any of them may import it.
"""
