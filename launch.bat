@echo off
rem SD Studio for Windows: double-click this file, or run it from cmd or PowerShell
rem (.\launch.bat --listen) with the same flags as launch.py. It finds Python 3.10+
rem (the py launcher first, then python on PATH), runs launch.py, and keeps the window
rem open when something fails so that the message can be read.
setlocal
cd /d "%~dp0"

set "PYTHON="
py -3 -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>nul
if not errorlevel 1 set "PYTHON=py -3"
if defined PYTHON goto run
python -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>nul
if not errorlevel 1 set "PYTHON=python"
if defined PYTHON goto run

echo SD Studio needs Python 3.10 or newer, and none was found.
echo Install it from https://www.python.org/downloads/windows/ and tick "Add python.exe to PATH",
echo then double-click launch.bat again.
pause
exit /b 1

:run
rem Hints printed by the studio name the command the user runs (this file), not python.
if not defined SDSTUDIO_LAUNCH_COMMAND set "SDSTUDIO_LAUNCH_COMMAND=.\launch.bat"
%PYTHON% "%~dp0launch.py" %*
set "CODE=%ERRORLEVEL%"
if "%CODE%"=="0" exit /b 0
echo.
echo SD Studio stopped with error code %CODE%. The lines above say why;
echo install logs are in data\logs\. Run ".\launch.bat doctor" for a report to paste into a bug report.
pause
exit /b %CODE%
