"""Integration tests against real peers (Orthanc, DCMTK) started by the tests."""
